from neurocat.cli import positive_int

HELP = "estimate time and memory per stage of jobs on a cluster, from a short calibration here"


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="image folder (only counted and sampled)")
    p.add_argument("--jobs", default="catalog,embed,audit", help="comma-separated jobs")
    p.add_argument("--workers", type=int, default=1, help="number of workers (GPUs, or CPU workers)")
    p.add_argument("--gpu", default="cpu", help="device of each worker: cpu (this machine), h100, h200, a100, l4, t4")
    p.add_argument("--images", type=positive_int, help="plan for this many images instead of the folder's count")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights")


def run(args) -> dict:
    import os

    from engine.errors import InputError
    from engine.files import dataset_file
    from engine.images import list_images
    from engine.models import load_model
    from engine.planner import DEVICES, JOB_PASSES, calibrate, plan

    if not os.path.isdir(args.data):
        raise InputError(f"data folder not found: {args.data}")
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOB_PASSES]
    if unknown or not jobs:
        raise InputError(f"unknown jobs {unknown}; known: {', '.join(JOB_PASSES)}")
    if args.gpu not in DEVICES:
        raise InputError(f"unknown device {args.gpu!r}; known: {', '.join(DEVICES)}")
    if args.workers < 1:
        raise InputError("--workers must be positive")
    entries = [e for e in list_images(args.data) if e.reason is None]
    model = load_model(args.model, args.weights, require_weights=False)
    cal = calibrate(model, [dataset_file(args.data, e.path) for e in entries])
    classes = len({e.label for e in entries}) or 1  # unlabelled images are one group, as the audit sees them
    result = plan(args.images or len(entries), jobs, args.workers, args.gpu, cal, classes=classes)
    result["calibration"] = {"decode_ms": round(cal.decode_s * 1e3, 2), "forward_ms": round(cal.forward_s * 1e3, 2),
                             "fwd_bwd_ms": round(cal.backward_s * 1e3, 2), "gemm_gflops": round(cal.gemm_gflops, 1),
                             "imputation_ms": round(cal.imputation_s * 1e3, 2),
                             "grabcut_ms": round(cal.segmentation_s * 1e3, 2)}
    return result
