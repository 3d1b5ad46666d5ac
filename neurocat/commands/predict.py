from neurocat.cli import run_options, with_runner

HELP = "classify every image; writes predictions.csv (path, label, pred_index, pred_wnid, pred_name, prob)"
JOB = True


def add_arguments(p) -> None:
    pass


def run(args) -> dict:
    from flows.predict import predict_flow

    opts = run_options(args)
    return with_runner(predict_flow, opts)(opts)
