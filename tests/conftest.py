"""Shared fixtures: one Prefect test harness per session, the shared images, the shipped model."""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SHARED_IMAGES = SHARED / "imagenet-sample-250"
DEMO_DATA = ROOT / "neurocat" / "demo_data"

_home = tempfile.mkdtemp(prefix="neurocat-prefect-")
os.environ["PREFECT_HOME"] = _home
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test harness for the whole session; yields its API URL for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def shared_images() -> Path:
    if not SHARED_IMAGES.is_dir():
        pytest.fail(f"shared images not found at {SHARED_IMAGES}")
    return SHARED_IMAGES


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def model():
    from engine.models import cached_model

    return cached_model("efficientnet_lite0")


@pytest.fixture
def unlistable(monkeypatch):
    """Makes folders that cannot be listed: chmod 000. Root lists them anyway (tests may run
    as root), so then os.scandir (what os.walk lists with) and os.access fail for exactly
    those folders with the error a user without permission gets. Permissions come back after."""
    folders: list[Path] = []

    def make(folder: Path) -> None:
        folder.chmod(0)
        folders.append(folder)
        if os.geteuid() != 0:
            return
        target, scandir, access = os.path.realpath(folder), os.scandir, os.access

        def is_target(path) -> bool:
            return isinstance(path, (str, os.PathLike)) and os.path.realpath(path) == target

        def denied_scandir(path="."):
            if is_target(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", denied_scandir)
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: not is_target(path) and access(path, mode, **kw))

    yield make
    for folder in reversed(folders):  # a folder inside another comes back after it
        folder.chmod(0o755)


def cli_env(api_url: str) -> dict:
    """Environment for a `neurocat` subprocess that talks to the session's Prefect API."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = api_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def neurocat_cmd() -> list[str]:
    return [sys.executable, "-m", "neurocat"]
