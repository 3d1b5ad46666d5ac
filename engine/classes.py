"""The ImageNet class list (WordNet ids and names, torchvision's order), without torch:
the report reads it too."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

CLASSES_TSV = Path(__file__).with_name("imagenet_classes.tsv")


@dataclass(frozen=True)
class ClassNames:
    """The 1000 ImageNet classes in torchvision order (sorted WordNet ids)."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    @functools.cached_property
    def index_of(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.wnids)}

    def __len__(self) -> int:
        return len(self.wnids)

    def name_of(self, label) -> str:
        """The readable name of a folder label that is an ImageNet WordNet id; any other
        label as it is (missing: "")."""
        if label is None or (isinstance(label, float) and label != label):
            return ""
        return self.names[self.index_of[label]] if label in self.index_of else str(label)


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> ClassNames:
    wnids, names = [], []
    for line in CLASSES_TSV.read_text().splitlines():
        if not line.strip():
            continue
        _, wnid, name = line.split("\t")
        wnids.append(wnid)
        names.append(name)
    return ClassNames(tuple(wnids), tuple(names))
