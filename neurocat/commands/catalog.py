from neurocat.cli import run_options, with_runner

HELP = ("neuron catalogue: top-K / bottom-K patches, statistics, projections and feature "
        "visualisations of every unit of some layers, as an HTML atlas")
JOB = True
DEFAULT_LAYERS = "_blocks.5,_blocks.10"  # mid-level EfficientNet-Lite0 blocks: 80 and 112 units, RF 83 and 339 px


def add_arguments(p) -> None:
    p.add_argument("--layers", default=DEFAULT_LAYERS,
                   help=f"comma-separated layer names or aliases (default {DEFAULT_LAYERS}; see `neurocat layers`)")
    p.add_argument("--top-k", type=int, default=16, help="images kept per unit, highest score first (default 16)")
    p.add_argument("--bottom-k", type=int, default=8, help="images kept per unit, lowest score first (default 8)")
    p.add_argument("--featvis", type=int, default=0, metavar="N",
                   help="feature visualisations of the first N units of each layer (default 0; slow on CPU)")
    p.add_argument("--projections", type=int, metavar="N",
                   help="guided-backprop projections of the top-1 patch for the first N units (default: all)")
    p.add_argument("--activation-images", default="4", metavar="N|PATHS",
                   help="store and show every unit's activation map on the first N usable images, or on these "
                        "comma-separated paths relative to --data (default 4; 0: none)")
    p.add_argument("--projection-rule", choices=["guided", "deconvnet"], default="guided",
                   help="ReLU backward rule of the projections (default guided)")


def run(args) -> dict:
    from engine.errors import InputError
    from engine.models import cached_model
    from flows.catalog import catalog_flow, check_activation_images

    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    if not layers:
        raise InputError("--layers needs at least one layer name")
    if args.top_k < 1 or args.bottom_k < 0 or args.featvis < 0 or (args.projections is not None and args.projections < 0):
        raise InputError("--top-k must be positive; --bottom-k, --featvis and --projections must not be negative")
    chosen = args.activation_images.strip()
    activation_images = int(chosen) if chosen.isdigit() else [p.strip() for p in chosen.split(",") if p.strip()]
    opts = run_options(args)
    model = cached_model(args.model, args.weights, args.device)
    for layer in layers:
        model.resolve(layer)  # a clear error before any flow starts
    check_activation_images(opts, activation_images)
    result = with_runner(catalog_flow, opts)(opts, layers, args.top_k, args.bottom_k, args.featvis,
                                              args.projections, args.projection_rule, activation_images)
    return {k: result[k] for k in ("store", "report", "atlas", "layers", "featvis") if k in result}
