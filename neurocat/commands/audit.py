import contextlib
import sys

from neurocat.cli import run_options, with_runner

HELP = ("dataset audit: duplicates, leakage, label issues, imbalance, outliers, spurious context, "
        "unit-level bias and drift since a previous audit; writes findings.json in the report folder")
JOB = True


def add_arguments(p) -> None:
    p.add_argument("--metadata", metavar="CSV",
                   help="CSV with a `path` column (relative to --data) and group columns (a `split` column names splits)")
    p.add_argument("--previous", metavar="STORE",
                   help="store of an earlier audit to compare with (`latest`: the newest other audit store beside --store)")
    p.add_argument("--fail-on", default="", metavar="KINDS",
                   help="comma-separated finding kinds that fail the run when present, e.g. near_duplicates,label_issues")
    p.add_argument("--bias-layers", default="fc7", help="layers whose units are tested for metadata bias (default fc7)")
    p.add_argument("--top-k", type=int, default=16, help="images per unit in the bias test (default 16)")
    p.add_argument("--context-per-class", type=int, default=4,
                   help="images per class occluded for the context test (default 4; 0 skips it)")


def run(args) -> dict:
    from engine.audit import read_metadata
    from engine.errors import InputError
    from engine.models import cached_model
    from flows.audit import LATEST, AuditGateFailed, AuditSettings, audit_flow, parse_fail_on, previous_audit
    from neurocat.cli import _print_result

    if args.metadata:
        read_metadata(args.metadata)  # a bad file is a one-line error before any flow starts
    fail_on = parse_fail_on(args.fail_on)
    layers = [x.strip() for x in args.bias_layers.split(",") if x.strip()]
    if args.top_k < 1 or args.context_per_class < 0:
        raise InputError("--top-k must be positive and --context-per-class not negative")
    opts = run_options(args)
    model = cached_model(args.model, args.weights, args.device)
    if args.previous and args.previous != LATEST:
        previous_audit(args.previous, model)  # so is a missing store, one without an audit, or another model's
    for layer in layers:
        model.resolve(layer)
    settings = AuditSettings(bias_layers=layers, top_k=args.top_k, context_per_class=args.context_per_class)
    try:
        return with_runner(audit_flow, opts)(opts, args.metadata, args.previous, fail_on, settings)
    except AuditGateFailed as gate:
        # the findings are written; print them like a success, then fail the command for CI
        with contextlib.redirect_stdout(sys.__stdout__):
            _print_result(gate.result, args.json)
        sys.__stdout__.flush()
        print(f"neurocat: {gate}", file=sys.stderr)
        raise SystemExit(1) from None
