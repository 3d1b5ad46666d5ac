"""`neurocat explain` end to end on a few demo images: store layout, report, resume, CLI errors."""

import subprocess

import numpy as np
import torch

from conftest import neurocat_cmd
from engine import attribution as A
from engine.images import load_preprocessed
from flows.common import RunOptions
from flows.explain import explain_flow
from storage.store import Store


def test_explain_flow_stores_maps_scores_masks_and_report(prefect_api, demo_data, tmp_path, model):
    opts = RunOptions(data=str(demo_data), store=str(tmp_path / "e.zarr"), report=str(tmp_path / "report"),
                      batch_size=2, shard_size=2)
    args = dict(methods="saliency,gradcam,cam,integrated_gradients", target="pred", steps=3, max_images=3,
                params={"integrated_gradients": {"steps": 4, "max_steps": 8}})
    result = explain_flow(opts, **args)
    store = Store(result["store"], mode="r")
    n = len(store.read_manifest())
    target = store.read("explain_info/target")
    assert result["images"] == 3 and (target[:3] >= 0).all() and (target[3:] == -1).all()
    for method in ("saliency", "gradcam", "cam"):
        arr = store.array(f"explain/{method}")
        assert arr.dtype == np.float16 and arr.shape == (n, 224, 224)
        facts = store.attrs(f"explain/{method}")["faithfulness"]
        assert set(facts) >= {"deletion", "insertion", "road_morf", "road_lerf", "road", "images"}
    assert "random" in store.attrs("explain")["faithfulness"]
    mask = store.read("explain_info/mask")
    assert mask.shape == (n, 224, 224) and 0 < mask[:3].mean() < 1

    # the stored map is the engine's map of that image, scaled to max 1
    path = demo_data / store.read_manifest()["path"][0]
    x = model.preprocessing.normalize(torch.from_numpy(load_preprocessed(path, model.preprocessing))[None])
    expected = A.saliency(model, x, torch.tensor([int(target[0])]))[0]
    assert np.abs(store.read("explain/saliency")[0].astype(np.float32) - (expected / expected.max()).numpy()).max() < 2e-3

    # IG's completeness error and steps per image: the engine's for that image (refined from 4 to
    # at most 8 steps where over 1%), in the store and on the page
    error = store.read("explain_info/integrated_gradients_completeness_error")
    used = store.read("explain_info/integrated_gradients_steps")
    _, expected_error, expected_steps = A.refined_integrated_gradients(model, x, torch.tensor([int(target[0])]),
                                                                       steps=4, max_steps=8)
    assert abs(float(error[0]) - float(expected_error[0])) < 1e-3 * max(1.0, float(expected_error[0]))
    assert used.dtype == np.int32 and used[0] == expected_steps[0] and set(used[:3]) <= {4, 8} and (used[3:] == 0).all()
    assert store.attrs("explain")["params"]["integrated_gradients"] == {"steps": 4, "max_steps": 8, "tolerance": 0.01}

    report = tmp_path / "report"
    html = (report / "explain.html").read_text()
    assert "random" in html and "deletion AUC" in html
    page = (report / "explain" / "images-1.html").read_text()
    assert all(f"completeness error {100 * float(e):.1f}% at {n} steps" in page for e, n in zip(error[:3], used[:3]))
    assert page.count('loading="lazy"') >= 3 * 5
    assert len(list((report / "explain" / "gradcam").glob("*.jpg"))) == 3

    # a rerun finds every shard done and leaves the arrays as they were
    markers = sorted((tmp_path / "e.zarr" / "_shards" / "explain").glob("*.json"))
    stamps = [m.stat().st_mtime_ns for m in markers]
    before = store.read("explain/gradcam")
    explain_flow(opts, **args)
    assert [m.stat().st_mtime_ns for m in markers] == stamps
    assert np.array_equal(Store(result["store"], mode="r").read("explain/gradcam"), before)


def test_cli_rejects_bad_methods_and_targets(tmp_path, demo_data):
    for extra in (["--methods", "saliency,telepathy"], ["--target", "cats"], ["--target", "1000"],
                  ["--methods", "integrated_gradients", "--ig-rule", "simpson"],
                  ["--methods", "integrated_gradients", "--ig-rule", "riemann_left", "--ig-steps", "1"],
                  ["--methods", "integrated_gradients", "--ig-probes", "0"],
                  ["--methods", "integrated_gradients", "--ig-baseline", "grey"],
                  ["--methods", "integrated_gradients", "--ig-baseline", "nan"],
                  ["--methods", "integrated_gradients", "--ig-max-steps", "32"],
                  ["--methods", "integrated_gradients", "--ig-tolerance", "-0.01"]):
        out = subprocess.run(neurocat_cmd() + ["explain", "--data", str(demo_data), *extra], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2, (extra, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    # a number option that float() takes but is no number
    out = subprocess.run(neurocat_cmd() + ["explain", "--data", str(demo_data), "--methods", "occlusion",
                                           "--occlusion-baseline", "inf"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--occlusion-baseline: not a finite number: 'inf'" in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr


def test_cli_rejects_a_segmenting_method_not_run_before_the_flow(tmp_path, demo_data):
    """`--segment-with` naming a method not run was checked inside the flow, so Prefect printed
    the flow's traceback (and a store was made) before the one-line error: now it is checked
    before the flow starts, as the other bad options are."""
    store = tmp_path / "e.zarr"
    out = subprocess.run(neurocat_cmd() + ["explain", "--data", str(demo_data), "--store", str(store), "--limit", "2",
                                           "--methods", "saliency", "--segment-with", "gradcam"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr == "neurocat: error: --segment-with gradcam is not one of the methods run (saliency)\n"
    assert not store.exists()
