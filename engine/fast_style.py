"""Fast style transfer (Johnson et al. 2016): a feed-forward net trained with the perceptual loss.

`TransformNet`: reflection-padded 9x9 conv, two stride-2 convs, residual blocks, two
nearest-upsample + conv stages and a 9x9 conv to RGB through a sigmoid, with instance
norm everywhere (Ulyanov et al.). With several styles the norms are conditional
(Dumoulin et al. 2017): one (gamma, beta) per style, and a mix of styles is a weighted
mix of those. Inputs of any size (odd too) are reflection-padded to a multiple of 4 and
the output is cropped back, so it always has the input's size.

Training minimises content + style loss of `engine.style` on random crops of a folder's
images; `width=16, blocks=3` at 96-128 px trains in minutes on a CPU (150 steps of
batch 4 at 96 px: about 4.5 minutes on one busy core, chow + zebra recognisable). Checkpoints are
plain float arrays (a dict name -> array plus a JSON-able config), saved in the store or an
.npz read with `allow_pickle=False`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import InputError
from engine.models import LoadedModel
from engine.optvis import objectives as obj
from engine.optvis.param import image_to_tensor, tensor_to_image
from engine.optvis.render import forward_layers, network
from engine.style import fit_size, mean_grams, normalize, style_layers


class CondInstanceNorm(nn.Module):
    """Instance norm whose scale and shift are a weighted mix of per-style parameters."""

    def __init__(self, channels: int, n_styles: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(n_styles, channels))
        self.beta = nn.Parameter(torch.zeros(n_styles, channels))

    def forward(self, x, mix):  # mix: [B, n_styles]
        x = F.instance_norm(x, eps=1e-5)
        return x * (mix @ self.gamma)[..., None, None] + (mix @ self.beta)[..., None, None]


class ConvNorm(nn.Module):
    def __init__(self, cin, cout, k, stride, n_styles, upsample=False, relu=True):
        super().__init__()
        self.upsample, self.relu = upsample, relu
        self.conv = nn.Conv2d(cin, cout, k, stride)
        self.pad = k // 2
        self.norm = CondInstanceNorm(cout, n_styles)

    def forward(self, x, mix):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.norm(self.conv(F.pad(x, (self.pad,) * 4, mode="reflect")), mix)
        return F.relu(x) if self.relu else x


class Residual(nn.Module):
    def __init__(self, c, n_styles):
        super().__init__()
        self.a = ConvNorm(c, c, 3, 1, n_styles)
        self.b = ConvNorm(c, c, 3, 1, n_styles, relu=False)

    def forward(self, x, mix):
        return x + self.b(self.a(x, mix), mix)


class TransformNet(nn.Module):
    def __init__(self, width: int = 32, blocks: int = 5, n_styles: int = 1):
        super().__init__()
        w = width
        self.n_styles = n_styles
        self.down = nn.ModuleList([ConvNorm(3, w, 9, 1, n_styles), ConvNorm(w, 2 * w, 3, 2, n_styles),
                                   ConvNorm(2 * w, 4 * w, 3, 2, n_styles)])
        self.res = nn.ModuleList([Residual(4 * w, n_styles) for _ in range(blocks)])
        self.up = nn.ModuleList([ConvNorm(4 * w, 2 * w, 3, 1, n_styles, upsample=True),
                                 ConvNorm(2 * w, w, 3, 1, n_styles, upsample=True)])
        self.out = nn.Conv2d(w, 3, 9, 1)

    def style_mix(self, style: int | list[float] | torch.Tensor, batch: int) -> torch.Tensor:
        """[B, n_styles] weights from a style index or a list of blend weights (normalised)."""
        if isinstance(style, int):
            if not 0 <= style < self.n_styles:
                raise InputError(f"style {style} out of range: this network knows {self.n_styles} styles")
            mix = F.one_hot(torch.tensor(style), self.n_styles).float()
        else:
            mix = torch.as_tensor(style, dtype=torch.float32)
            if mix.shape[-1] != self.n_styles:
                raise InputError(f"need {self.n_styles} style weights, got {mix.shape[-1]}")
            mix = mix / mix.sum(-1, keepdim=True)
        return mix.expand(batch, -1) if mix.dim() == 1 else mix

    def forward(self, x: torch.Tensor, style: int | list[float] | torch.Tensor = 0) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> stylised [B, 3, H, W] in [0, 1], any H, W."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        mode = "reflect" if min(h, w) > 4 else "replicate"
        y = F.pad(x, (0, pw, 0, ph), mode=mode)
        mix = self.style_mix(style, x.shape[0]).to(x)
        for m in self.down:
            y = m(y, mix)
        for m in self.res:
            y = m(y, mix)
        for m in self.up:
            y = m(y, mix)
        # the 9x9 conv to 3 channels in channels-last: 4.5x faster forward+backward on CPU (oneDNN)
        y = F.pad(y, (4,) * 4, mode="reflect").contiguous(memory_format=torch.channels_last)
        y = torch.sigmoid(self.out(y))
        return y[..., :h, :w]


@dataclass
class FastStyleOptions:
    width: int = 16
    blocks: int = 3
    size: int = 128  # training crop
    batch: int = 4
    steps: int = 300
    lr: float = 2e-3
    content_weight: float = 1.0
    style_weight: float = 0.3  # 1-3 (the optimisation's values) wash the content out of a briefly trained net
    style_size: int = 224
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Checkpoint:
    """A trained net as plain arrays plus the config to rebuild it."""

    arrays: dict[str, np.ndarray]
    config: dict = field(default_factory=dict)

    def build(self) -> TransformNet:
        net = TransformNet(self.config["width"], self.config["blocks"], self.config["n_styles"])
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in self.arrays.items()}
        net.load_state_dict(state, strict=True)
        return net.eval().requires_grad_(False)

    @classmethod
    def of(cls, net: TransformNet, **config) -> "Checkpoint":
        arrays = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
        return cls(arrays, {"width": net.down[0].conv.out_channels, "blocks": len(net.res),
                            "n_styles": net.n_styles, **config})

    def save_npz(self, path) -> None:
        import json

        np.savez(path, __config__=np.frombuffer(json.dumps(self.config).encode(), np.uint8), **self.arrays)

    @classmethod
    def load_npz(cls, path) -> "Checkpoint":
        import json

        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "__config__"}
            config = json.loads(z["__config__"].tobytes().decode())
        return cls(arrays, config)


def random_crops(images: list[np.ndarray], size: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """A batch of random size x size crops (after fitting the shorter side to size * 1.15)."""
    out = []
    for _ in range(batch):
        img = fit_size(image_to_tensor(images[int(torch.randint(len(images), (1,), generator=g))]),
                       round(size * 1.15))
        h, w = img.shape[-2:]
        y, x = int(torch.randint(h - size + 1, (1,), generator=g)), int(torch.randint(w - size + 1, (1,), generator=g))
        out.append(img[..., y:y + size, x:x + size])
    return torch.cat(out)


def train_fast_style(model: LoadedModel, content_images: list[np.ndarray], styles: list[np.ndarray],
                     opts: FastStyleOptions = FastStyleOptions(), log_every: int = 0) -> tuple[Checkpoint, np.ndarray]:
    """Train one net for all `styles` (conditional IN); returns the checkpoint and the loss per step."""
    if not content_images or not styles:
        raise InputError("fast style training needs content images and at least one style image")
    tuned = style_layers(model)
    s_layers, c_layer = tuple(model.resolve(l) for l in tuned.style), model.resolve(tuned.content)
    pnet = network(model, tuned.smooth, tuned.avg_pool)
    targets = [mean_grams(model, pnet, fit_size(image_to_tensor(s), opts.style_size), s_layers) for s in styles]
    torch.manual_seed(opts.seed)
    g = torch.Generator().manual_seed(opts.seed)
    net = TransformNet(opts.width, opts.blocks, len(styles)).to(model.device)
    adam = torch.optim.Adam(net.parameters(), lr=opts.lr)
    losses = []
    t0 = time.perf_counter()
    for step in range(opts.steps):
        x = random_crops(content_images, opts.size, opts.batch, g).to(model.device)
        k = step % len(styles)
        y = net(x, k)
        with torch.no_grad():
            c_target = forward_layers(model, pnet, normalize(model, x), [c_layer])[c_layer]
        objective = opts.content_weight * obj.content(c_layer, c_target) + opts.style_weight * sum(
            obj.style(l, targets[k][l]) for l in s_layers)
        loss = objective(forward_layers(model, pnet, normalize(model, y), objective.layers), y)
        adam.zero_grad()
        loss.backward()
        adam.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"fast-style step {step + 1}/{opts.steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    net.eval()
    return Checkpoint.of(net, n_training_steps=opts.steps, options=opts.to_dict()), np.asarray(losses)


def apply_fast_style(net: TransformNet, images: np.ndarray, style: int | list[float] = 0) -> np.ndarray:
    """uint8 [H, W, 3] (or a same-size batch) -> stylised uint8 of the same shape."""
    single = images.ndim == 3
    with torch.no_grad():
        out = tensor_to_image(net(image_to_tensor(images).to(next(net.parameters()).device), style))
    return out[0] if single else out
