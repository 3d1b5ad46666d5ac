"""What the benchmarks share: the repository on sys.path, the shared images, their model inputs,
the interleaved best-of timing.

Each benchmark runs as a script (`python bench/NAME.py`), so this module is found beside it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data" / "imagenet-sample-250"


def model_inputs(model, paths):
    """The normalised model input of `paths`, decoded as the jobs decode them: float [N, 3, H, W]."""
    import numpy as np
    import torch

    from engine.images import load_preprocessed

    images = np.stack([load_preprocessed(p, model.preprocessing) for p in paths])
    return model.preprocessing.normalize(torch.from_numpy(images))


def predicted_inputs(data, every: slice):
    """The shipped model, a slice (`every`) of `data`'s images in the jobs' order, their
    model inputs and the model's predictions for them (the explanation benchmarks' targets)."""
    import torch

    from engine.images import list_images
    from engine.models import cached_model

    model = cached_model("efficientnet_lite0")
    paths = [Path(data) / e.path for e in list_images(data)][every]
    x = model_inputs(model, paths)
    with torch.no_grad():
        return model, paths, x, model.module(x).argmax(1)


def best_of_interleaved(contenders: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Every contender (a no-argument callable) timed `repeats` times, interleaved so that load
    drifting during the run hits them alike: each one's best wall time, and what its last
    call returned."""
    best = {name: float("inf") for name in contenders}
    results = {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, results
