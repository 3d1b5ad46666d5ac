FLOW = True
HELP = "(re)build the HTML report of a store, or with --compare a comparison of two runs"


def add_arguments(p) -> None:
    p.add_argument("--store", required=True, help="the run's zarr store (run A with --compare)")
    p.add_argument("--compare", metavar="STORE_B", help="a second run's store: build a comparison of the two")
    p.add_argument("--out", help="report folder (default <store>-report, or <A>-vs-<B> with --compare)")


def run(args) -> dict:
    from pathlib import Path

    from engine.errors import InputError
    from flows.common import default_report
    from flows.report import report_flow
    from neurocat.cli import check_folder, wait_for_api
    from reports.folder import check_report_folder

    for store in filter(None, [args.store, args.compare]):
        if not (Path(store) / "zarr.json").exists():
            raise InputError(f"no neurocat store at {store}")
    if args.compare:
        a, b = Path(args.store), Path(args.compare)
        out = args.out or str(a.parent / f"{a.stem}-vs-{b.stem}")
    else:
        out = args.out or default_report(args.store)
    check_folder(out, "out")
    check_report_folder(out, args.store)
    wait_for_api()
    return report_flow(args.store, out, args.compare)
