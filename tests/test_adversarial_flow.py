"""The adversarial job end to end on a few demo images: store arrays, summary, transfer,
resume, the robustness report, and bad arguments."""

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.attacks import fgsm, pixel_forward, to_pixels, to_uint8
from engine.errors import InputError
from flows.adversarial import adversarial_flow
from flows.common import RunOptions
from neurocat.commands import adversarial as command
from storage.store import Store

EPS = ["2/255", "8/255"]


@pytest.fixture(scope="module")
def run(prefect_api, demo_data, tmp_path_factory):
    """FGSM at two eps on the first 10 demo files (one truncated), 3 shards of one batch each,
    with the shipped model as its own transfer target."""
    tmp = tmp_path_factory.mktemp("adv")
    opts = RunOptions(data=str(demo_data), store=str(tmp / "a.zarr"), report=str(tmp / "report"), limit=10,
                      batch_size=4, shard_size=4)
    result = adversarial_flow(opts, attack="fgsm", eps_list=",".join(EPS), transfer_model="efficientnet_lite0")
    return opts, result


def test_store_holds_what_the_attack_made(run, model):
    opts, result = run
    store = Store(opts.store, mode="r")
    root = "adversarial/fgsm-linf"
    assert result["group"] == "fgsm-linf"
    ok = store.read_manifest()["status"].values == "ok"
    clean = store.read(f"{root}/clean/images")[ok]
    labels = store.read(f"{root}/label")[ok]
    shard_of = np.flatnonzero(ok) // opts.shard_size
    for key, eps in [("2_255", 2), ("8_255", 8)]:
        adv = store.read(f"{root}/{key}/images")[ok]
        diff = adv.astype(int) - clean.astype(int)
        assert np.abs(diff).max() == eps  # in grey levels: inside the ball and using it
        if eps == 8:  # the stored images are the engine's FGSM on the fast form, recomputed batch by batch as the flow ran them
            expected = np.concatenate([
                to_uint8(fgsm(pixel_forward(model, fast=True), to_pixels(torch.from_numpy(clean[b])),
                              torch.from_numpy(labels[b]).long(), eps / 255), to_pixels(torch.from_numpy(clean[b]))).numpy()
                for b in np.split(np.arange(len(clean)), np.flatnonzero(np.diff(shard_of)) + 1)])
            assert np.array_equal(adv, expected)
        gain = store.attrs(f"{root}/{key}/perturbation")["gain"]
        pert = store.read(f"{root}/{key}/perturbation")[ok]
        assert np.array_equal(pert, np.clip(np.round(128 + gain * diff), 0, 255).astype(np.uint8))
        linf = store.read(f"{root}/{key}/linf")[ok]
        assert np.allclose(linf, np.abs(diff).reshape(len(diff), -1).max(1) / 255)
    summary = store.attrs(root)["summary"]
    assert summary["images"] == ok.sum() == 9  # the truncated demo file is skipped
    with torch.no_grad():
        adv8 = store.read(f"{root}/8_255/images")[ok]
        pred = pixel_forward(model)(to_pixels(torch.from_numpy(adv8))).argmax(1).numpy()
    row = summary["per_eps"][1]
    assert row["accuracy"] == pytest.approx((pred == labels).mean())
    assert row["accuracy"] < summary["clean_accuracy"]
    # transfer to the very same model must reproduce the white-box numbers exactly
    assert row["transfer_accuracy"] == row["accuracy"]
    assert summary["clean_transfer_accuracy"] == summary["clean_accuracy"]


def test_rerun_resumes_without_attacking_again(run):
    opts, _ = run
    store = Store(opts.store)
    before = store.read("adversarial/fgsm-linf/8_255/images")
    # shards 0 and 1; shard 2 holds the truncated file, whose manifest status (part of the
    # shard fingerprint, flows/common.py) turned from ok to skipped after the first run
    markers = [store.path / "_shards" / "adversarial-fgsm-linf" / f"{i}.json" for i in (0, 1)]
    stamps = [m.stat().st_mtime_ns for m in markers]
    adversarial_flow(opts, attack="fgsm", eps_list=",".join(EPS), transfer_model="efficientnet_lite0")
    assert [m.stat().st_mtime_ns for m in markers] == stamps
    assert np.array_equal(store.read("adversarial/fgsm-linf/8_255/images"), before)


def test_robustness_report(run):
    opts, _ = run
    opts_report = Path(opts.report)
    html = (opts_report / "adversarial" / "fgsm-linf.html").read_text()
    assert "Examples at eps 8/255" in html and "transfer top-1" in html
    assert (opts_report / "adversarial" / "accuracy.png").stat().st_size > 5000
    assert (opts_report / "adversarial" / "fgsm-linf" / "confidence.png").exists()
    assert len(list((opts_report / "adversarial" / "fgsm-linf" / "8_255").glob("*.png"))) == 8
    assert 'href="adversarial.html"' in (opts_report / "index.html").read_text()


def parse(argv):
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


@pytest.mark.parametrize("extra", [["--eps", "4/0"], ["--eps", "x,1/255"], ["--targeted", "not-a-class"],
                                   ["--step-size", "-1"], ["--transfer-weights", "w.pth"], ["--steps", "0"],
                                   ["--attack", "universal", "--targeted", "banana"]])
def test_bad_arguments_are_input_errors(demo_data, extra):
    with pytest.raises(InputError):
        command.run(parse(["--data", str(demo_data), *extra]))


def test_fractions_and_classes_parse(demo_data):
    args = parse(["--data", str(demo_data), "--attack", "bim", "--eps", "1/255,0.5/255", "--targeted", "banana"])
    assert args.attack == "bim" and args.eps == "1/255,0.5/255" and args.targeted == "banana"


def test_universal_perturbation_job(prefect_api, demo_data, tmp_path):
    """One perturbation per eps, fitted on 4 images, applied to every image of the dataset."""
    opts = RunOptions(data=str(demo_data), store=str(tmp_path / "u.zarr"), limit=6, batch_size=4, shard_size=4)
    result = adversarial_flow(opts, attack="universal", eps_list="8/255", steps=2, universal_images=4)
    store = Store(opts.store, mode="r")
    root = "adversarial/universal-linf"
    assert result["group"] == "universal-linf"
    delta = store.read(f"{root}/8_255/delta")
    assert delta.shape == (3, 224, 224) and np.abs(delta).max() <= 8 / 255 + 1e-6 and np.abs(delta).max() > 0
    clean = store.read(f"{root}/clean/images")
    x = clean.astype(np.float32) / np.float32(255)
    change = (np.clip(x + delta.transpose(1, 2, 0), 0, 1) - x) * np.float32(255)  # stored: whole levels toward 0
    expected = (clean + np.sign(change) * np.floor(np.abs(change) + 1e-4)).astype(np.uint8)
    assert np.array_equal(store.read(f"{root}/8_255/images"), expected)
    attrs = store.attrs(root)
    assert attrs["universal"]["fitted_on"] == 4 and len(attrs["universal"]["fooling_rate_per_sweep"]["8_255"]) <= 2
    assert "fitted on the first 4 images" in (Path(result["report"]).parent / "adversarial" / "universal-linf.html").read_text()
