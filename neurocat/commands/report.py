HELP = "(re)build the HTML report of a store"


def add_arguments(p) -> None:
    p.add_argument("--store", required=True, help="the run's zarr store")
    p.add_argument("--out", help="report folder (default <store>-report)")


def run(args) -> dict:
    from pathlib import Path

    from engine.errors import InputError
    from flows.report import report_flow

    if not (Path(args.store) / "zarr.json").exists():
        raise InputError(f"no neurocat store at {args.store}")
    out = args.out or str(Path(args.store).with_suffix("")) + "-report"
    return report_flow(args.store, out)
