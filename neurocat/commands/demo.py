from neurocat.cli import run_options, with_runner

HELP = "run every job on the dataset the repo ships and write one HTML report"
JOB = True
DATA_REQUIRED = False


def add_arguments(p) -> None:
    pass


def run(args) -> dict:
    from flows.demo import demo_data_path, demo_flow

    if args.data is None:
        args.data = str(demo_data_path())
    opts = run_options(args)
    return with_runner(demo_flow, opts)(opts)
