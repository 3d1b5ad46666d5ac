"""The `neurocat` command line. Each subcommand lives in `neurocat/commands/<name>.py`.

A command module defines `HELP`, `add_arguments(parser)` and `run(args) -> dict`; job
commands (`JOB = True`) also get the common options and run a Prefect flow (other commands
that run one say `FLOW = True`: with no API configured, a temporary Prefect server is
started early for both, and a flow runs through `with_runner` or after `wait_for_api`). The dict it
returns is printed as `key: value` lines, or as one JSON object with `--json`.
Exit codes: 0 success, 2 bad arguments or unusable input, 1 internal error.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from neurocat.prefect_env import prefect_defaults

COMMANDS = ["demo", "predict", "catalog", "embed", "neighbors", "audit", "explain", "render",
            "report", "layers", "plan"]


def _prepare_environment(verbose: bool) -> None:
    """Prefect settings that must be in place before Prefect is imported (and Dask's log
    level before distributed is: its scheduler and workers log at INFO otherwise); a running
    neurocat server, when there is one, as the API."""
    prefect_defaults("INFO" if verbose else "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose else "warning")
    if not os.environ.get("PREFECT_API_URL"):
        url = os.environ.get("NEUROCAT_PREFECT_SERVER", "http://127.0.0.1:4200/api")
        if _server_alive(url):
            os.environ["PREFECT_API_URL"] = url


def _die_with_parent():
    """For a child process: on Linux, SIGTERM when this process dies, even killed (-9), when no
    atexit runs. The server also runs in its own session, so a terminal's Ctrl-C reaches the
    command (which stops the server at exit) and not the server under a flow that is ending."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


class TemporaryApiServer:
    """Prefect's API for one command when none is configured: the server process Prefect's
    ephemeral mode runs (uvicorn on `create_app`, UI off, the same database), started here
    as soon as the settings are read, so it comes up (~4 s) while the command imports torch
    and its flow, and without importing prefect.server into this process (~3 s of CPU that
    Prefect's own ephemeral start spends first). The command talks to it as to any server
    (`PREFECT_API_URL`, in the settings and in the environment of the processes it starts);
    it is stopped at exit, and killed at once if no flow used it.
    """

    def __init__(self):
        import prefect
        from prefect.settings import get_current_settings

        with socket.socket() as s:  # a port the system just gave out: free, and not handed out again soon
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        self.used = False  # a flow waited for it
        self.log = tempfile.TemporaryFile()  # its output, for the message if it fails to start
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent())
        atexit.register(self.stop)

    def wait(self) -> None:
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        self.used = True
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        while not _server_alive(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace").strip().splitlines()[-5:]
                state = (f"exited with code {self.process.returncode}" if self.process.poll() is not None
                         else "did not answer in time")
                raise RuntimeError(f"Prefect's temporary API server at {self.url} {state}: " + " | ".join(tail))
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            # unused, it may still be starting, and its services print tracebacks when stopped then
            (self.process.terminate if self.used else self.process.kill)()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_temporary_api: TemporaryApiServer | None = None


def _start_api_server() -> contextlib.AbstractContextManager:
    """A TemporaryApiServer unless an API is configured (a server, a profile's, or the test
    harness's settings), as Prefect's own client decides; the settings that point to it
    while the command runs."""
    global _temporary_api
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    _temporary_api = TemporaryApiServer()
    os.environ["PREFECT_API_URL"] = _temporary_api.url  # for the processes the command starts (Dask workers)
    # no UI: no "View at <url>" links to it in the flow's log
    return temporary_settings(updates={PREFECT_API_URL: _temporary_api.url, PREFECT_UI_URL: ""})


def wait_for_api() -> None:
    """Before a flow runs: block until the temporary API server answers (if one was started)."""
    if _temporary_api is not None:
        _temporary_api.wait()


def _server_alive(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=0.5) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 - no server is the normal case
        return False


def positive_int(text: str) -> int:
    """argparse type of a count option: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type of a number option: float() alone also takes 'nan' and 'inf', which would
    run a whole job on NaNs."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def add_common_options(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--data", required=data_required, help="image folder (ImageFolder layout or flat)")
    g.add_argument("--model", default="efficientnet_lite0",
                   help="efficientnet_lite0 (default, weights shipped), or a torchvision ResNet, VGG or AlexNet "
                        "name with --weights; an unknown name lists them all")
    g.add_argument("--weights", help="local state_dict file (torch.load weights_only=True)")
    g.add_argument("--store", help="zarr store path (default runs/<run-id>.zarr)")
    g.add_argument("--report", help="report folder (default <store>-report)")
    g.add_argument("--runner", default="threads", help="threads (default) | dask | dask-cuda | tcp://host:port")
    g.add_argument("--cluster", help="cluster profile YAML (address or cluster_class; overrides --runner)")
    g.add_argument("--workers", type=int, help="Dask workers for --runner dask (default 1)")
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    g.add_argument("--shard-size", type=int, default=256, help="images per shard task (default 256)")
    g.add_argument("--limit", type=int, help="use only the first N files")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")


def check_folder(path: str | None, option: str) -> None:
    """A folder option to write into: an existing file there is a typo, not a place to write."""
    from engine.errors import InputError

    if path and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--{option} {path} is a file, not a folder")


def check_options(args) -> None:
    """The checks of the common options that need nothing imported: made before anything starts."""
    from engine.errors import InputError
    from reports.folder import check_report_folder

    data = getattr(args, "data", None)
    if data is not None and not os.path.isdir(data):
        raise InputError(f"data folder not found: {data}")
    if data is not None and not os.access(data, os.R_OK | os.X_OK):
        raise InputError(f"data folder cannot be listed: {data} (permission denied)")
    weights = getattr(args, "weights", None)
    if weights and not os.path.isfile(weights):
        raise InputError(f"weights file not found: {weights}")
    for option in ("store", "report"):
        check_folder(getattr(args, option, None), option)
    if getattr(args, "report", None):
        check_report_folder(args.report, getattr(args, "store", None))
    numbers = [getattr(args, name, None) for name in ("batch_size", "shard_size", "limit", "workers")]
    if any(v is not None and v < 1 for v in numbers):
        raise InputError("--batch-size, --shard-size, --limit and --workers must be positive")


def run_options(args, **overrides):
    """RunOptions from parsed common options, checked before any flow starts (`main` made
    `check_options` before anything started; the cluster profile and weights here)."""
    from flows.common import RunOptions

    if args.cluster:
        from flows.runners import load_profile

        load_profile(args.cluster)
    from engine.models import cached_model

    cached_model(args.model, args.weights, args.device)  # fail fast on bad weights; the flow reuses it
    if args.store:
        from storage.store import check_free

        check_free(args.store)
    progress = sys.stderr.isatty() and not args.json
    return RunOptions(data=getattr(args, "data", None), model=args.model, weights=args.weights, store=args.store,
                      report=args.report, runner=args.cluster or args.runner, workers=args.workers,
                      batch_size=args.batch_size, limit=args.limit, device=args.device, shard_size=args.shard_size,
                      progress=progress, **overrides)


def with_runner(flow_fn, opts):
    """The flow with the task runner `--runner` names, once the API it reports to is up."""
    from flows.runners import task_runner

    runner = task_runner(opts.runner, opts.workers)
    wait_for_api()
    return flow_fn.with_options(task_runner=runner)


class ArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line and exit 2, like every other usage error of the CLI
    (argparse prints the whole usage first); subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = ArgumentParser(prog="neurocat", description="Dataset-scale CNN interpretability.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"neurocat.commands.{name.replace('-', '_')}")
        except ModuleNotFoundError as e:
            if e.name == f"neurocat.commands.{name.replace('-', '_')}":
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        if getattr(mod, "JOB", False):
            add_common_options(p, data_required=getattr(mod, "DATA_REQUIRED", True))
        mod.add_arguments(p)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
        modules[name] = mod
    return parser, modules


def _print_result(result: dict, as_json: bool) -> None:
    """One JSON object, or `key: value` lines that end with the store and report paths (the
    report's is the last line, the one to open)."""
    if as_json:
        print(json.dumps(result, default=str))
        return
    last = ("store", "report")
    for key, value in sorted(result.items(), key=lambda kv: last.index(kv[0]) + 1 if kv[0] in last else 0):
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    from engine.memory import tune_malloc

    tune_malloc()  # before any thread allocates: shard tasks' threads then share the main arena
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from neurocat import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    _prepare_environment(args.verbose)
    command = modules[args.command]
    from engine.errors import InputError
    from storage.store import StoreLockedError

    real_stdout = sys.stdout
    try:
        api = contextlib.nullcontext()
        if getattr(command, "JOB", False) or getattr(command, "FLOW", False):
            check_options(args)  # the usual mistakes, reported before the server starts
            api = _start_api_server()
        # keep stdout clean for --json: anything a library prints goes to stderr
        with api, contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = command.run(args)
    except (InputError, StoreLockedError) as e:
        print(f"neurocat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurocat: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("neurocat: internal error (above); please report it", file=sys.stderr)
        return 1
    sys.stdout = real_stdout
    try:
        _print_result(result or {}, args.json)
    except BrokenPipeError:
        return _reader_gone()
    return 0


def _reader_gone() -> int:
    """stdout's reader has stopped reading (`neurocat layers | head`): end quietly, as a Unix
    tool does, not with a traceback and "internal error"; the rest of the output goes nowhere."""
    sys.stdout = sys.__stdout__
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
