"""The planner: calibration on real images, stage arithmetic, the bounding stage, CLI errors."""

import json
import subprocess

import numpy as np
import pytest
import torch

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


def test_explain_plan_counts_imputation_and_masks_apart():
    """ROAD's imputations run on the model's device (at its speed relative to a forward here),
    GrabCut on the workers' CPU cores; both come after the model passes."""
    cal = Calibration(decode_s=0.01, forward_s=0.05, backward_s=0.15, cores=2, gemm_gflops=20.0,
                      imputation_s=0.01, segmentation_s=0.2)
    cpu = plan(1000, ["explain"], 2, "cpu", cal)
    assert cpu["stages_s"]["imputation"] == pytest.approx(1000 * 60 * 0.01 / 2, rel=1e-3)
    assert cpu["stages_s"]["segmentation"] == pytest.approx(1000 * 0.2 / 2, rel=1e-3)
    s = cpu["stages_s"]
    assert cpu["total_s"] == pytest.approx(max(s["decode"], s["forward"] + s["backward"]) + s["imputation"]
                                           + s["segmentation"], abs=0.02)
    h100 = plan(1000, ["explain"], 1, "h100", cal)["stages_s"]
    assert h100["imputation"] == pytest.approx(1000 * 60 * (0.01 / 0.05) / 12000.0, rel=1e-3)
    assert h100["segmentation"] == pytest.approx(1000 * 0.2 * 2 / 16, rel=1e-3)  # 16 cores, not 2
    assert "imputation" not in plan(1000, ["catalog"], 1, "cpu", cal)["stages_s"]


def test_shared_forward_pass_is_counted_once():
    a = plan(1000, ["embed"], 1, "cpu", CAL)
    b = plan(1000, ["predict", "embed", "audit"], 1, "cpu", CAL, classes=0)  # no context sample
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


def default_args(*command):
    """The parsed defaults of a neurocat command (what the planner's pass counts assume)."""
    from neurocat.cli import build_parser

    parser, _ = build_parser()
    return parser.parse_args([*command, "--data", "unused"])


def count_passes(model, monkeypatch):
    """Images through the model, counted where they go in: `run_model` (forward only) in the
    modules that call it, and the eager module (with a graph: a gradient pass; without: a
    forward); calls pass through unchanged."""
    from engine import attribution, faithfulness

    rows = {"forward": 0, "gradient": 0}
    for module in (attribution, faithfulness):
        def counted(m, x, *args, _run=module.run_model, **kwargs):
            rows["forward"] += len(x)
            return _run(m, x, *args, **kwargs)
        monkeypatch.setattr(module, "run_model", counted)

    def hook(_module, inputs, output):
        rows["gradient" if output.requires_grad else "forward"] += len(inputs[0])
    return rows, model.module.register_forward_hook(hook)


def test_explain_pass_count_is_what_explain_runs(model, shared_images, monkeypatch):
    """The planner's explain estimate (172 forwards + 3 gradients an image with the defaults;
    it said 1 + 8 before, 7x under the measured time) against the passes explain_batch makes."""
    from engine import explanations, faithfulness
    from engine.images import list_images, load_preprocessed
    from engine.planner import JOB_EXTRAS, JOB_PASSES, explain_extras, explain_passes

    args = default_args("explain")
    methods = args.methods.split(",")
    images = torch.from_numpy(np.stack([load_preprocessed(shared_images / e.path, model.preprocessing)
                                        for e in list_images(shared_images)[:4]]))
    rows, handle = count_passes(model, monkeypatch)
    rows.update(imputation=0, segmentation=0)

    def counting(kind, fn):
        def counted(images, *args, **kwargs):
            rows[kind] += len(images)
            return fn(images, *args, **kwargs)
        return counted
    monkeypatch.setattr(faithfulness, "impute", counting("imputation", faithfulness.impute))
    monkeypatch.setattr(explanations, "grabcut_masks", counting("segmentation", explanations.grabcut_masks))
    try:  # the flow's default segment_with ("auto"): the first method's map
        explanations.explain_batch(model, images, [-1] * 4, methods, steps=args.faithfulness_steps,
                                   segment_with=methods[0])
    finally:
        handle.remove()
    want = explain_passes(len(methods), args.faithfulness_steps)
    assert JOB_PASSES["explain"] == want
    assert rows["gradient"] / 4 == want[1]
    assert abs(rows["forward"] / 4 - want[0]) <= 0.25  # the all-grey image is one pass for the batch
    assert JOB_EXTRAS["explain"] == explain_extras(len(methods))
    assert {k: rows[k] / 4 for k in ("imputation", "segmentation")} == JOB_EXTRAS["explain"]


def test_adversarial_pass_count_is_what_the_default_attack_runs(model, shared_images):
    from engine.attacks import AttackSpec, parse_eps_list, pixel_forward
    from engine.images import list_images, load_preprocessed
    from engine.planner import JOB_PASSES

    args = default_args("render", "adversarial")
    eps = parse_eps_list(args.eps)
    spec = AttackSpec(args.attack, args.norm, args.steps)
    x = torch.from_numpy(np.stack([load_preprocessed(shared_images / e.path, model.preprocessing)
                                   for e in list_images(shared_images)[:2]])).permute(0, 3, 1, 2).float() / 255
    rows = {"gradient": 0}
    handle = model.module.register_forward_hook(
        lambda _m, inputs, output: rows.__setitem__("gradient", rows["gradient"] + len(inputs[0]) * output.requires_grad))
    try:
        for e in eps:
            spec.run(pixel_forward(model), x, torch.zeros(2, dtype=torch.long), e, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert JOB_PASSES["adversarial"] == (1 + len(eps), rows["gradient"] / 2)


def test_audit_context_sample_is_per_class():
    """The audit's context check runs on up to 4 images a class (as the flow's default), so
    it costs every image of 250 one-image classes and almost nothing of ImageNet."""
    from engine.planner import AUDIT_CONTEXT_PER_CLASS
    from flows.audit import AuditSettings

    assert AUDIT_CONTEXT_PER_CLASS == AuditSettings().context_per_class
    small = plan(250, ["audit"], 1, "cpu", CAL, classes=250)
    assert small["stages_s"]["backward"] == pytest.approx(250 * CAL.backward_s)
    assert small["stages_s"]["forward"] == pytest.approx(250 * 4 * CAL.forward_s)
    imagenet = plan(1_281_167, ["audit"], 1, "cpu", CAL, classes=1000)
    assert imagenet["stages_s"]["backward"] == pytest.approx(4000 * CAL.backward_s)
