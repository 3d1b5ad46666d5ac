"""render_flow end to end on real images: arrays with full attrs, a grid as parallel tasks,
a rerun that skips done renders, fast style over a folder, the gallery pages, the CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from engine.style import STYLE_LAYERS
from tests.conftest import cli_env, neurocat_cmd


@pytest.fixture(scope="module")
def images(shared_images):
    return [str(shared_images / "n02112137" / "n02112137_chow.JPEG"),
            str(shared_images / "n02391049" / "n02391049_zebra.JPEG")]


def _opts(tmp_path):
    from flows.common import RunOptions

    return RunOptions(store=str(tmp_path / "r.zarr"), report=str(tmp_path / "report"))


def test_render_flow_writes_every_parameter_and_skips_done_renders(prefect_api, tmp_path, images):
    from flows.render import render_flow
    from storage.store import Store

    params = {"size": 48, "steps": 4, "seed": 3, "style_weight": 3.0, "record": [2]}
    jobs = [{"name": f"chow-sw{sw}", "params": {**params, "style_weight": sw}, "inputs": images}
            for sw in (1.0, 10.0)]
    out = render_flow(_opts(tmp_path), "style", jobs)
    assert out["renders"] == 2 and out["skipped"] == 0
    store = Store(out["store"], mode="r")
    img = store.read("render/style/chow-sw1.0")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) == 48
    attrs = store.attrs("render/style/chow-sw1.0")
    assert attrs["params"]["seed"] == 3 and attrs["params"]["style_weight"] == 1.0
    assert attrs["model"] == "efficientnet_lite0" and attrs["weights_sha256"] and attrs["seconds"] > 0
    assert attrs["inputs"] == images and attrs["finished"]
    used = attrs["settings"]  # the defaults the render resolved, not only the parameters asked for
    assert used["style_layers"] == list(STYLE_LAYERS["efficientnet_lite0"].style)
    assert used["content_layer"] == STYLE_LAYERS["efficientnet_lite0"].content
    assert (used["lr"], used["optimizer"], used["steps"], used["style_weight"]) == (1.0, "lbfgs", 4, 1.0)
    assert store.read("render/style/_steps/chow-sw1.0").shape[0] == 1
    assert not np.array_equal(img, store.read("render/style/chow-sw10.0"))
    page = (tmp_path / "report" / "render" / "style-1.html").read_text()
    assert "chow-sw10.0" in page and "style_weight" in page and STYLE_LAYERS["efficientnet_lite0"].style[-1] in page
    again = render_flow(_opts(tmp_path), "style", jobs)
    assert again["skipped"] == 2


@pytest.mark.parametrize("kind, params", [
    ("dream", {"size": 32, "octaves": 1, "steps": 1}),
    ("texture", {"size": 32, "steps": 1}),
    ("classvis", {"class_index": 340, "size": 32, "steps": 1}),
    ("invert", {"size": 32, "steps": 1}),
    ("featvis", {"layer": "_blocks.3", "channel": 2, "size": 32, "steps": 1}),
])
def test_every_render_records_the_settings_it_used(model, images, kind, params):
    """Each render's settings hold every option with its default and the layer it resolved,
    so the store says how an image was made even where the command line left a default."""
    from tasks.render import RENDERERS

    used = RENDERERS[kind](model, dict(params), images).settings
    asked = {k: v for k, v in params.items() if not (kind == "dream" and k == "size")}  # dream's input size
    assert {k: used[k] for k in asked} == asked
    assert used["seed"] == 0 and "lr" in used and "smooth" in used
    names = [used[k] for k in ("layer", "content_layer") if k in used] + used.get("layers", [])
    assert len(names) == (0 if kind == "classvis" else 1 if kind != "texture" else 5), used
    assert all(n == model.resolve(n) for n in names), names  # module paths, not aliases such as fc7


def test_fast_style_flow_trains_once_and_stylises_a_folder(prefect_api, tmp_path, images):
    from flows.render import render_flow
    from storage.store import Store

    fast = {"name": "zebra", "styles": [images[1]], "train_images": images[:1],
            "params": {"size": 32, "batch": 1, "steps": 2, "width": 4, "blocks": 1},
            "apply_items": [("chow", images[0]), ("zebra", images[1])], "style": 0, "size": 45}
    out = render_flow(_opts(tmp_path), "fast-style", fast_style=fast)
    store = Store(out["store"], mode="r")
    assert out["rendered"] == 2
    assert min(store.read("render/fast-style/chow").shape[:2]) == 45
    assert store.attrs("render/fast-style/_checkpoints/zebra")["config"]["n_styles"] == 1


@pytest.mark.slow
def test_cli_render_featvis_and_classvis(prefect_api, tmp_path):
    store = str(tmp_path / "c.zarr")
    for args in (["featvis", "--layer", "_blocks.6", "--channels", "1,2", "--size", "48", "--steps", "4"],
                 ["classvis", "--classes", "n02391049,1", "--size", "48", "--steps", "4"]):
        r = subprocess.run([*neurocat_cmd(), "render", *args, "--store", store, "--json"],
                           env=cli_env(prefect_api), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["renders"] == 2
    bad = subprocess.run([*neurocat_cmd(), "render", "featvis", "--layer", "nope", "--channels", "1",
                          "--store", store], env=cli_env(prefect_api), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no layer" in bad.stderr


def test_cli_render_rejects_bad_number_lists(tmp_path, images):
    """Comma lists are parsed by the command: a bad entry is a one-line error naming the option,
    before any render starts (nothing is written)."""
    for args, option in ((["featvis", "--layer", "_blocks.6", "--channels", "1,x"], "--channels"),
                         (["style", str(images[0]), "--style", str(images[1]), "--style-weight", "1,nan"],
                          "--style-weight"),
                         # channels out of the layer's range (80 at _blocks.6): were a traceback, or silently
                         # a render of nothing (dream) or of the last channel (-1)
                         (["featvis", "--layer", "_blocks.6", "--channels", "1,80"], "--channels"),
                         (["featvis", "--layer", "_blocks.6", "--channels", "-1"], "--channels"),
                         (["dream", str(images[0]), "--layer", "_blocks.6", "--channel", "5000"], "--channel"),
                         # layer names and blend weights checked before Prefect starts, not in the task
                         (["invert", str(images[0]), "--layer", "nope"], "model efficientnet_lite0 has no layer 'nope'"),
                         (["style", str(images[0]), "--style", str(images[1]), "--blend", "0.5,0.5"], "--blend")):
        bad = subprocess.run([*neurocat_cmd(), "render", *args, "--store", str(tmp_path / "r.zarr")],
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and f"error: {option}" in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert not (tmp_path / "r.zarr").exists()
