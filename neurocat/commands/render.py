"""`neurocat render KIND ...`: DeepDream, style, texture, fast style, class and feature visualisation,
inversion, fooling images.

Each kind has its own subparser (argparse cannot take the common options after a
subcommand otherwise). Inputs are image files or folders given as arguments (or --data).
A comma list in --style-weight (style) or --classes / --channels renders a grid, one task each.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter
from pathlib import Path

from engine.errors import InputError
from neurocat.cli import add_common_options, finite_float, run_options, with_runner

HELP = "render DeepDream, style transfer, textures, fast style, class/feature visualisations, inversions, fooling images"
JOB = False
FLOW = True
KINDS = ["dream", "style", "texture", "fast-style", "classvis", "invert", "featvis", "fooling"]


def _floats(s: str, option: str) -> list[float]:
    """A comma list of numbers; a bad one is an InputError naming its option."""
    try:
        return [finite_float(v) for v in s.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        raise InputError(f"{option}: {e}") from None


def _ints(s: str, option: str) -> list[int]:
    """A comma list of whole numbers; a bad one is an InputError naming its option."""
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option}: not a comma list of whole numbers: {s!r}") from None


def _common(sp, size: int, steps: int, images: bool) -> None:
    add_common_options(sp, data_required=False)
    if images:
        sp.add_argument("images", nargs="*", help="image files or folders (default: --data)")
    sp.add_argument("--size", type=int, default=size, help="render size in pixels (shorter side)")
    sp.add_argument("--steps", type=int, default=steps)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--lr", type=finite_float, help="step size (default: the kind's tuned value)")
    sp.add_argument("--record", default="",
                    help="steps to keep as intermediate images, e.g. 10,50 (dream keeps every octave's)")
    _output_options(sp)


def _output_options(sp) -> None:
    """--json and -v, also after the kind; given before it (`render --json dream`), they stand."""
    sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object on stdout")
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Prefect's logs")


def _adversarial_module():
    try:
        return importlib.import_module("neurocat.commands.adversarial")
    except ModuleNotFoundError as e:
        if e.name == "neurocat.commands.adversarial":
            return None
        raise


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    sp = sub.add_parser("dream", help="DeepDream: amplify a layer's activations in photos")
    _common(sp, 224, 10, True)
    sp.add_argument("--layer", default="_blocks.10")
    sp.add_argument("--channel", type=int)
    sp.add_argument("--octaves", type=int, default=4)
    sp.add_argument("--octave-scale", type=finite_float, default=1.4)
    sp.add_argument("--jitter", type=int, default=32)
    sp.add_argument("--tile", type=int, help="compute gradients in tiles of this many pixels")
    sp.add_argument("--overlap", type=int, default=64)

    sp = sub.add_parser("style", help="neural style transfer (Gatys): content images in the style of --style")
    _common(sp, 224, 150, True)
    sp.add_argument("--style", action="append", required=True, help="style image (repeat to blend styles)")
    sp.add_argument("--blend", help="weights of the style images, e.g. 0.7,0.3")
    sp.add_argument("--style-weight", default="3", help="one value, or a comma list for a grid")
    sp.add_argument("--content-weight", type=finite_float, default=1.0)
    sp.add_argument("--tv-weight", type=finite_float, default=0.0)
    sp.add_argument("--style-scale", type=finite_float, default=1.0)
    sp.add_argument("--style-layers", help="comma list (default: the model's tuned layers)")
    sp.add_argument("--content-layer")
    sp.add_argument("--init", default="content", choices=["content", "style", "noise"])
    sp.add_argument("--preserve-color", default="none", choices=["none", "luminance", "histogram"])
    sp.add_argument("--optimizer", default="lbfgs", choices=["lbfgs", "adam"])

    sp = sub.add_parser("texture", help="texture synthesis from Gram matrices of each source image")
    _common(sp, 224, 200, True)
    sp.add_argument("--layers", help="comma list (default: the model's style layers)")
    sp.add_argument("--optimizer", default="lbfgs", choices=["lbfgs", "adam"])

    sp = sub.add_parser("fast-style", help="train a Johnson transform net for --style, apply it to the images")
    _common(sp, 0, 300, True)
    sp.add_argument("--style", action="append", required=True, help="style image (repeat: conditional IN)")
    sp.add_argument("--apply-style", default="0", help="style index, or blend weights like 0.5,0.5")
    sp.add_argument("--train-data", help="folder of training images (default: the images)")
    sp.add_argument("--train-size", type=int, default=128)
    sp.add_argument("--width", type=int, default=16)
    sp.add_argument("--blocks", type=int, default=3)
    sp.add_argument("--style-weight", type=finite_float, default=0.3)
    sp.add_argument("--name", default="default", help="checkpoint name in the store")

    sp = sub.add_parser("classvis", help="class visualisation by regularised gradient ascent")
    _common(sp, 224, 200, False)
    sp.add_argument("--classes", required=True, help="class indices or WordNet ids, comma separated")
    sp.add_argument("--l2-weight", type=finite_float, default=1.0)
    sp.add_argument("--decay", type=finite_float, default=0.001)
    sp.add_argument("--blur-every", type=int, default=4)
    sp.add_argument("--blur-sigma", type=finite_float, default=0.5)
    sp.add_argument("--clip-norm-pct", type=finite_float, default=10.0)
    sp.add_argument("--clip-contribution-pct", type=finite_float, default=10.0)
    sp.add_argument("--jitter", type=int, default=8)

    sp = sub.add_parser("invert", help="feature inversion: an image with the same embedding")
    _common(sp, 224, 200, True)
    sp.add_argument("--layer", default="fc7", help="layer to invert, or a comma list to compare depths (default fc7)")
    sp.add_argument("--tv-weight", type=finite_float, default=5.0)
    sp.add_argument("--tv-beta", type=finite_float, default=2.0)

    sp = sub.add_parser("featvis", help="feature visualisation of units (the catalogue's implementation)")
    _common(sp, 128, 128, False)
    sp.add_argument("--layer", required=True)
    sp.add_argument("--channels", required=True, help="comma list of channel indices")

    sp = sub.add_parser("fooling", help="fooling images: step photos (or grey noise) until the model reads --classes")
    _common(sp, 224, 100, True)
    sp.add_argument("--noise", action="store_true", help="start from grey noise of --size px instead of the images")
    sp.add_argument("--classes", required=True, help="target class indices or WordNet ids, comma separated")
    sp.add_argument("--confidence", type=finite_float, default=0.9, help="stop once p(target) reaches this")
    sp.add_argument("--eps", help="L-inf bound on the change of an image, e.g. 8/255 (default: none)")

    adversarial = _adversarial_module()
    if adversarial is not None:
        sp = sub.add_parser("adversarial", help=adversarial.HELP)
        adversarial.add_arguments(sp)  # adds the common options itself
        _output_options(sp)


def input_files(args) -> list[str]:
    """Image paths from the positional arguments (files or folders) or --data, --limit applied."""
    from engine.files import dataset_file
    from engine.images import list_images

    paths = []
    for p in list(args.images or []) or ([args.data] if args.data else []):
        path = Path(p)
        if path.is_dir():
            for e in list_images(path):
                if e.reason:
                    print(f"neurocat: skipping {path / e.path}: {e.reason}", file=sys.stderr)
                else:
                    paths.append(dataset_file(path, e.path))
        elif path.is_file():
            paths.append(str(path))
        else:
            raise InputError(f"no such image or folder: {p}")
    if not paths:
        raise InputError("give image files or folders (or --data)")
    paths = list(dict.fromkeys(paths))  # a file given twice is one input
    return paths[:args.limit] if args.limit else paths


def _usable(paths: list[str]) -> list[str]:
    """Drop files that cannot be decoded (said on stderr) so one bad file does not fail a grid."""
    from engine.images import ImageError, open_image

    ok = []
    for p in paths:
        try:
            open_image(p)
            ok.append(p)
        except ImageError as e:
            print(f"neurocat: skipping {p}: {e}", file=sys.stderr)
    return ok


def _classes(text: str, model) -> list[int]:
    """Class indices from a comma list of indices or WordNet ids."""
    classes = [int(c) if c.strip().isdigit() else model.classes.index_of.get(c.strip(), -1) for c in text.split(",")]
    if any(not 0 <= c < len(model.classes) for c in classes):
        raise InputError(f"--classes: unknown class in {text!r} (give indices 0-{len(model.classes) - 1} "
                         "or WordNet ids)")
    return classes


def _class_name(model, c: int) -> str:
    return f"{c}-{model.classes.names[c]}".replace("/", "_")


def _names(paths: list[str]) -> dict[str, str]:
    """A render name per input: its file stem or, where stems repeat (class folders of 1.jpg,
    2.jpg ...), its folder and stem, numbered if that repeats too: two inputs never share one
    store array (the second overwrote the first, and both were counted)."""
    stems = Counter(Path(p).stem for p in paths)
    names, taken = {}, set()
    for p in paths:
        path = Path(p)
        base = name = path.stem if stems[path.stem] == 1 else f"{path.parent.name}-{path.stem}"
        n = 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        names[p] = name
        taken.add(name)
    return names


def _check_numbers(args) -> None:
    """Sizes, steps and octaves a render can run with (0 crashed in the loop, not here)."""
    if args.steps < 1:
        raise InputError(f"--steps: must be at least 1, got {args.steps}")
    if args.size < (0 if args.kind == "fast-style" else 1):  # fast style's 0: each image at its own size
        raise InputError(f"--size: must be positive, got {args.size}")
    if getattr(args, "octaves", 1) < 1:
        raise InputError(f"--octaves: must be at least 1, got {args.octaves}")


def _check_spatial(model, layer: str, option: str) -> None:
    """Gram matrices are over a layer's positions: a [C] output (the logits, fc7 pooled) has none."""
    from engine.models import output_shapes

    if len(output_shapes(model).get(model.resolve(layer), ())) != 3:
        raise InputError(f"--{option.replace('_', '-')}: {layer} has no spatial map to take a Gram matrix of")


def _kw(args, **extra) -> dict:
    base = {"steps": args.steps, "seed": args.seed}
    if args.lr is not None:
        base["lr"] = args.lr
    return {**base, **extra}


def plan(args, model) -> tuple[list[dict], dict | None]:
    """The kind's jobs (or fast style's one training + folder) from the parsed arguments."""
    from engine.models import check_channels

    _check_numbers(args)
    record = _ints(args.record, "--record")
    if record and args.kind in ("dream", "fast-style", "fooling"):
        raise InputError(f"--record: {args.kind} keeps no intermediate steps"
                         f"{' (it keeps every octave)' if args.kind == 'dream' else ''}")
    if args.kind == "classvis":
        classes = _classes(args.classes, model)
        params = _kw(args, size=args.size, l2_weight=args.l2_weight, decay=args.decay, blur_every=args.blur_every,
                     blur_sigma=args.blur_sigma, clip_norm_pct=args.clip_norm_pct,
                     clip_contribution_pct=args.clip_contribution_pct, jitter=args.jitter, record=record)
        return [{"name": _class_name(model, c), "params": {**params, "class_index": c}} for c in classes], None
    if args.kind == "featvis":
        layer = model.resolve(args.layer)
        channels = _ints(args.channels, "--channels")
        check_channels(model, layer, channels, "--channels")
        return [{"name": f"{layer}-{c}", "params": {"layer": layer, "channel": c, "size": args.size,
                                                    **_kw(args), "record": record}}
                for c in channels], None
    for option in ("layer", "layers", "style_layers", "content_layer"):  # every layer named, before any work
        for name in (getattr(args, option, None) or "").split(","):
            if name.strip():
                model.resolve(name.strip())
                if option in ("layers", "style_layers"):
                    _check_spatial(model, name.strip(), option)
    if args.kind == "fooling":
        from engine.attacks import parse_eps

        classes = _classes(args.classes, model)
        if not 0 < args.confidence < 1:
            raise InputError(f"--confidence: must be between 0 and 1, got {args.confidence:g}")
        try:
            eps = parse_eps(args.eps) if args.eps else None
        except InputError as e:
            raise InputError(f"--eps: {e}") from None
        p = _kw(args, size=args.size, confidence=args.confidence, eps=eps)
        starts = [None] if args.noise else _usable(input_files(args))
        name = _names([i for i in starts if i]) | {None: "noise"}
        return [{"name": f"{name[i]}-to-{_class_name(model, c)}", "params": {**p, "class_index": c},
                 "inputs": [i] if i else []} for i in starts for c in classes], None
    if args.kind == "dream" and args.channel is not None:
        check_channels(model, args.layer, [args.channel], "--channel")
    images = _usable(input_files(args))
    name = _names(images)
    if args.kind == "dream":
        p = _kw(args, size=args.size, layer=model.resolve(args.layer), channel=args.channel, octaves=args.octaves,
                octave_scale=args.octave_scale, jitter=args.jitter, tile=args.tile, overlap=args.overlap)
        return [{"name": name[i], "params": p, "inputs": [i]} for i in images], None
    if args.kind == "invert":  # a comma list of layers: the notes' comparison of depths, one render each
        layers = [name.strip() for name in args.layer.split(",") if name.strip()]
        return [{"name": name[i] + (f"-{layer}" if len(layers) > 1 else ""),
                 "params": _kw(args, size=args.size, layer=layer, tv_weight=args.tv_weight, tv_beta=args.tv_beta,
                               record=record),
                 "inputs": [i]} for i in images for layer in layers], None
    if args.kind == "texture":
        p = _kw(args, size=args.size, optimizer=args.optimizer, record=record,
                layers=args.layers.split(",") if args.layers else None)
        return [{"name": name[i], "params": p, "inputs": [i]} for i in images], None
    styles = _usable(args.style)
    if len(styles) != len(args.style):
        raise InputError("a --style image cannot be read")
    if getattr(args, "blend", None) and len(_floats(args.blend, "--blend")) != len(styles):
        raise InputError(f"--blend: one weight per --style image ({len(styles)}), got {args.blend!r}")
    if args.kind == "style":
        jobs = []
        for sw in _floats(args.style_weight, "--style-weight"):
            p = _kw(args, size=args.size, style_weight=sw, content_weight=args.content_weight,
                    tv_weight=args.tv_weight, style_scale=args.style_scale, init=args.init,
                    preserve_color=args.preserve_color, optimizer=args.optimizer, record=record,
                    blend=_floats(args.blend, "--blend") if args.blend else None,
                    style_layers=args.style_layers.split(",") if args.style_layers else None,
                    content_layer=args.content_layer)
            suffix = f"-sw{sw:g}" if "," in args.style_weight else ""
            jobs += [{"name": name[i] + suffix, "params": p, "inputs": [i, *styles]} for i in images]
        return jobs, None
    train = _usable(input_files(argparse.Namespace(images=[args.train_data], data=None, limit=args.limit))) \
        if args.train_data else images
    apply_style = _floats(args.apply_style, "--apply-style")
    fast = {"name": args.name, "styles": styles, "train_images": train,
            "params": _kw(args, size=args.train_size, width=args.width, blocks=args.blocks,
                          style_weight=args.style_weight),
            "apply_items": [(name[i], i) for i in images],
            "style": int(apply_style[0]) if len(apply_style) == 1 else apply_style, "size": args.size or None}
    return [], fast


def run(args) -> dict:
    if args.kind == "adversarial":
        return _adversarial_module().run(args)
    from flows.render import render_flow

    from engine.models import cached_model

    opts = run_options(args)
    jobs, fast = plan(args, cached_model(opts.model, opts.weights, opts.device))
    return with_runner(render_flow, opts)(opts, args.kind, jobs, fast)
