"""prefect.yaml end to end: `prefect deploy --all` against the session's Prefect API, one run
of the scheduled audit deployment through a process work pool, findings written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client

from conftest import ROOT, cli_env


def prefect(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, (args, out.stdout[-3000:], out.stderr[-3000:])
    return out


def test_prefect_yaml_declares_a_scheduled_audit():
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    audit = deployments["audit-weekly"]
    assert audit["entrypoint"] == "flows/audit.py:audit_flow"
    assert audit["schedules"][0]["cron"] and audit["work_pool"]["name"] == "neurocat-process"
    assert {"predict", "demo"} <= set(deployments)


@pytest.mark.slow
def test_audit_deployment_runs_through_a_process_worker(prefect_api, demo_data, tmp_path):
    env = cli_env(prefect_api)
    for pool in ("neurocat-process", "neurocat-gpu"):  # the steps prefect.yaml's header gives
        prefect(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "--all"], env)
    listed = prefect(["deployment", "ls"], env).stdout
    for name in ("audit/audit-weekly", "predict/predict", "demo/demo",
                 "neurocat-job/catalog-gpu", "neurocat-job/embed-gpu"):
        assert name in listed, listed
    params = {"opts": {"data": str(demo_data), "store": str(tmp_path / "a.zarr"), "report": str(tmp_path / "r"),
                       "limit": 12, "batch_size": 12},
              "previous": None, "settings": {"calibration_images": 4, "context_per_class": 0}}
    started = prefect(["deployment", "run", "audit/audit-weekly", "--params", json.dumps(params)], env).stdout
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", started).group(1)
    worker = prefect(["worker", "start", "--pool", "neurocat-process", "--run-once"], env, timeout=900)
    (tmp_path / "worker.log").write_text(worker.stdout + worker.stderr)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(run_id))
    assert run.state.is_completed(), (run.state, f"worker output in {tmp_path / 'worker.log'}")
    findings = json.loads((tmp_path / "r" / "findings.json").read_text())
    assert "near_duplicates" in findings and findings["imbalance"]["classes"]["counts"]
