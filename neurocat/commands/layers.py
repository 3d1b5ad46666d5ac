from neurocat.cli import positive_int

HELP = "list a model's layers with output shapes and receptive fields (no Prefect needed)"


def add_arguments(p) -> None:
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", help="optional; shapes do not need weights")
    p.add_argument("--input-size", type=positive_int,
                   help="square input side (default: the model's crop; at least the model's smallest, 32 for "
                        "efficientnet_lite0)")


def run(args) -> dict:
    from engine.errors import InputError
    from engine.models import layer_table, load_model, smallest_input

    model = load_model(args.model, args.weights, require_weights=False)
    if args.input_size is not None and args.input_size < smallest_input(model):
        raise InputError(f"--input-size {args.input_size} is too small: {model.name} needs at least "
                         f"{smallest_input(model)}")
    rows = layer_table(model, args.input_size)
    if not args.json:
        width = max(len(r["layer"]) for r in rows)
        for r in rows:
            rf = r["rf_size"] if r["rf_size"] in ("global", None) else "x".join(map(str, r["rf_size"]))
            print(f"{r['layer']:<{width}}  {r['type']:<26} {'x'.join(map(str, r['shape'])):<14} rf {rf}")
        return {"model": model.name, "layers": len(rows), "fc7": model.spec.fc7}
    return {"model": model.name, "fc7": model.spec.fc7, "layers": rows}
