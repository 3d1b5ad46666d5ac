"""Prefect settings a neurocat process (the CLI, a benchmark) needs before Prefect is imported."""

from __future__ import annotations

import os


def prefect_defaults(logging_level: str = "WARNING") -> None:
    """No telemetry, time for the ephemeral server to start on a busy machine, and `logging_level`;
    a value already in the environment wins."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", logging_level)
