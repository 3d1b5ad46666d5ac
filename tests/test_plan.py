"""The planner: calibration on real images, stage arithmetic, the bounding stage, CLI errors."""

import json
import subprocess

import pytest

from conftest import neurocat_cmd
from engine.planner import Calibration, plan

CAL = Calibration(decode_s=0.01, forward_s=0.05, backward_s=0.15, cores=2, gemm_gflops=20.0)


def test_stages_scale_with_workers_and_images():
    one = plan(10_000, ["catalog"], 1, "cpu", CAL)
    two = plan(10_000, ["catalog"], 2, "cpu", CAL)
    big = plan(20_000, ["catalog"], 1, "cpu", CAL)
    assert two["stages_s"]["forward"] == pytest.approx(one["stages_s"]["forward"] / 2, rel=1e-3)
    assert big["stages_s"]["forward"] == pytest.approx(one["stages_s"]["forward"] * 2, rel=1e-3)
    assert one["bound_by"] == "forward"  # 50 ms forward vs 10 ms decode per image
    assert one["total_s"] >= max(one["stages_s"].values())


def test_gpu_workers_move_the_bottleneck():
    cpu = plan(1_281_167, ["catalog"], 1, "cpu", CAL)
    h100 = plan(1_281_167, ["catalog"], 8, "h100", CAL)
    assert cpu["bound_by"] == "forward"
    assert h100["bound_by"] == "decode"  # a GPU outruns its CPU cores' JPEG decoding
    assert h100["total_s"] < cpu["total_s"] / 100
    knn = plan(1_281_167, ["embed"], 1, "h100", CAL)
    assert 60 < knn["stages_s"]["knn"] < 3600  # exact kNN graph of 1.28M x 1280 in minutes


def test_shared_forward_pass_is_counted_once():
    a = plan(1000, ["embed"], 1, "cpu", CAL)
    b = plan(1000, ["predict", "embed", "audit"], 1, "cpu", CAL)
    assert b["stages_s"]["forward"] == pytest.approx(a["stages_s"]["forward"], rel=1e-6)


def test_plan_command(shared_images):
    out = subprocess.run(neurocat_cmd() + ["plan", "--data", str(shared_images), "--jobs", "catalog,embed",
                                           "--gpu", "h100", "--workers", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["images"] == 250 and result["bound_by"] in result["stages_s"]
    assert result["calibration"]["decode_ms"] > 0 and result["calibration"]["forward_ms"] > 0
    bad = subprocess.run(neurocat_cmd() + ["plan", "--data", str(shared_images), "--jobs", "dance"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown jobs" in bad.stderr
