"""render_flow end to end on real images: arrays with full attrs, a grid as parallel tasks,
a rerun that skips done renders, fast style over a folder, the gallery pages, the CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from engine.errors import InputError
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


def test_fooling_images_are_read_as_their_target_class(prefect_api, tmp_path, images, model):
    """From a photo within an L-inf ball and from grey noise, the stored uint8 image (not the
    float one the ascent ended on) is what the facts describe: its top class is the target and
    its target probability is the model's on the stored bytes; the photo moved at most eps."""
    import torch

    from engine.attacks import pixel_forward, to_pixels
    from flows.render import render_flow
    from storage.store import Store
    from tasks.render import load_image

    params = {"size": 64, "steps": 60, "lr": 2 / 255, "class_index": 954}  # banana
    jobs = [{"name": "chow-to-banana", "params": {**params, "eps": 16 / 255}, "inputs": images[:1]},
            {"name": "noise-to-banana", "params": params, "inputs": []}]
    out = render_flow(_opts(tmp_path), "fooling", jobs)
    store = Store(out["store"], mode="r")
    forward = pixel_forward(model)
    for job in jobs:
        key = f"render/fooling/{job['name']}"
        image, facts = store.read(key), store.attrs(key)["facts"]
        with torch.no_grad():
            prob = forward(to_pixels(torch.from_numpy(image)[None])).softmax(1)[0]
        assert int(prob.argmax()) == facts["top_class"] == 954, (job["name"], facts)
        assert abs(float(prob[954]) - facts["target_probability"]) < 1e-3
        assert 0 < facts["steps_taken"] <= 60 and store.attrs(key)["settings"]["start"] == (
            "image" if job["inputs"] else "noise")
    photo = load_image(images[0], 64).astype(np.int16)
    change = np.abs(store.read("render/fooling/chow-to-banana").astype(np.int16) - photo).max()
    assert 0 < change <= 16
    assert "target_probability" in (tmp_path / "report" / "render" / "fooling-1.html").read_text()


def test_recorded_steps_belong_to_the_render_they_sit_beside(prefect_api, tmp_path, images):
    """--record was ignored for invert and classvis; and a render made again without --record
    kept the steps of the earlier one, shown with the new image (a sweep of the CLI found both)."""
    from flows.render import render_flow
    from storage.store import Store

    params = {"size": 32, "steps": 3, "layer": "_blocks.2"}
    render_flow(_opts(tmp_path), "invert", [{"name": "chow", "params": {**params, "record": [1, 2]},
                                             "inputs": images[:1]}])
    store = Store(str(tmp_path / "r.zarr"), mode="r")
    assert store.read("render/invert/_steps/chow").shape == (2, 32, 32, 3)
    assert store.attrs("render/invert/_steps/chow")["steps"] == [1, 2]
    render_flow(_opts(tmp_path), "invert", [{"name": "chow", "params": params, "inputs": images[:1]}])
    assert not Store(str(tmp_path / "r.zarr"), mode="r").has("render/invert/_steps/chow")


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
                 ["classvis", "--classes", "n02391049,1", "--size", "48", "--steps", "4"],
                 ["fooling", "--noise", "--classes", "954,n02391049", "--size", "48", "--steps", "3"]):
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


@pytest.mark.parametrize("args, option", [
    (["fooling", "--noise", "--classes", "954,banana"], "--classes"),
    (["fooling", "IMAGE", "--classes", "954", "--eps", "8/0"], "--eps"),
    (["fooling", "--noise", "--classes", "954", "--confidence", "1.5"], "--confidence"),
    # zero sizes and counts crashed inside the render; a [C] layer has no Gram matrix
    (["classvis", "--classes", "1", "--steps", "0"], "--steps"),
    (["featvis", "--layer", "_blocks.0", "--channels", "0", "--size", "0"], "--size"),
    (["dream", "IMAGE", "--octaves", "0"], "--octaves"),
    (["texture", "IMAGE", "--layers", "logits"], "--layers"),
    (["fooling", "--noise", "--classes", "954", "--record", "2"], "--record"),  # was ignored silently
])
def test_render_plans_refuse_values_no_render_runs_with(model, images, args, option):
    """The same InputError the command prints in one line (exit 2, as in the test above),
    raised by the plan before any render starts."""
    from neurocat.cli import build_parser
    from neurocat.commands.render import plan

    parser, _ = build_parser()
    with pytest.raises(InputError) as e:
        plan(parser.parse_args(["render", *[images[0] if a == "IMAGE" else a for a in args]]), model)
    assert str(e.value).startswith(option), str(e.value)


def test_render_page_shows_renders_whose_names_look_like_url_syntax(tmp_path, images):
    """A render is named after its input file, which may hold '#', '?', '%' or a leading dot:
    each image on the render page must still load (a raw '#' made the rest a fragment)."""
    import html.parser
    import urllib.parse
    from pathlib import Path

    from reports.site import build_site
    from storage.store import Store
    from tasks.render import render_task

    store = str(tmp_path / "r.zarr")
    Store(store)
    names = ["pct%20%41 #frag?x=1", ".hidden", "plain-name_1.0"]
    for name in names:
        render_task.fn(store, "dream", name, {"size": 32, "octaves": 1, "steps": 1}, images[:1],
                       "efficientnet_lite0", None, "cpu")
    page = Path(build_site(store, tmp_path / "report")).parent / "render" / "dream-1.html"

    class Sources(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.found += [v for k, v in attrs if k == "src"]

    parser = Sources()
    parser.feed(page.read_text())
    files = [page.parent / urllib.parse.unquote(urllib.parse.urlsplit(src).path) for src in parser.found]
    assert len(files) > len(names) and all(f.is_file() for f in files), parser.found  # renders, steps, sheet
    assert all(name in page.read_text() for name in ("pct%20%41 #frag?x=1", ".hidden"))


@pytest.mark.parametrize("argv, json_out, verbose", [
    (["render", "--json", "classvis", "--classes", "1"], True, False),
    (["render", "classvis", "--classes", "1", "--json"], True, False),
    (["render", "-v", "featvis", "--layer", "x", "--channels", "1"], False, True),
    (["render", "adversarial", "--data", "d", "--json"], True, False),
    (["render", "dream"], False, False),
])
def test_output_options_count_before_or_after_the_kind(argv, json_out, verbose):
    """`render --json KIND` printed key: value lines: the kind's own --json default overwrote it."""
    from neurocat.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(argv)
    assert (args.json, args.verbose) == (json_out, verbose)


def test_invert_compares_depths_given_a_list_of_layers(model, images):
    """The notes' "effect of layer depth": `--layer` takes a comma list, one inversion per
    image and layer, named after both; an unknown layer in the list is refused before any work."""
    from neurocat.cli import build_parser
    from neurocat.commands.render import plan

    parser, _ = build_parser()
    jobs, _ = plan(parser.parse_args(["render", "invert", *images, "--layer", "_blocks.2, fc7", "--steps", "5"]),
                   model)
    assert [(j["name"], j["params"]["layer"], j["inputs"]) for j in jobs] == [
        ("n02112137_chow-_blocks.2", "_blocks.2", images[:1]), ("n02112137_chow-fc7", "fc7", images[:1]),
        ("n02391049_zebra-_blocks.2", "_blocks.2", images[1:]), ("n02391049_zebra-fc7", "fc7", images[1:])]
    assert all(j["params"]["steps"] == 5 for j in jobs)
    single, _ = plan(parser.parse_args(["render", "invert", images[0]]), model)
    assert [(j["name"], j["params"]["layer"]) for j in single] == [("n02112137_chow", "fc7")]
    with pytest.raises(InputError, match="nope"):
        plan(parser.parse_args(["render", "invert", images[0], "--layer", "fc7,nope"]), model)


def test_inputs_with_one_file_name_get_renders_of_their_own(model, images, tmp_path):
    """Class folders of 1.jpg, 2.jpg ...: every render was named after the file's stem, so the
    second overwrote the first in the store while both were counted. Now a repeated stem
    takes its folder's name (numbered if that repeats too); a file given twice is one input."""
    import shutil

    from neurocat.cli import build_parser
    from neurocat.commands.render import plan

    for folder, src in (("cat", images[0]), ("dog", images[1])):
        (tmp_path / "data" / folder).mkdir(parents=True)
        shutil.copy(src, tmp_path / "data" / folder / "1.jpg")
    shutil.copy(images[0], tmp_path / "1.jpg")
    parser, _ = build_parser()
    jobs, _ = plan(parser.parse_args(["render", "dream", str(tmp_path / "data"), str(tmp_path / "1.jpg"),
                                      str(tmp_path / "1.jpg"), "--size", "48"]), model)
    assert [j["name"] for j in jobs] == ["cat-1", "dog-1", f"{tmp_path.name}-1"]
    fooling, _ = plan(parser.parse_args(["render", "fooling", str(tmp_path / "data"), "--classes", "954"]), model)
    assert [j["name"] for j in fooling] == ["cat-1-to-954-banana", "dog-1-to-954-banana"]


@pytest.mark.slow
def test_demo_renders_on_another_data_folder_use_its_images(prefect_api, shared_images, tmp_path):
    """`neurocat demo --data DIR` crashed at the renders: they named the shipped chow and zebra."""
    import shutil

    from prefect import flow

    from flows.common import RunOptions, scan_dataset
    from flows.render import run_demo_renders
    from storage.store import Store

    data = tmp_path / "data" / "n01440764"
    data.mkdir(parents=True)
    shutil.copy(shared_images / "n01440764" / "n01440764_tench.JPEG", data / "tench.JPEG")
    opts = RunOptions(data=str(tmp_path / "data"), store=str(tmp_path / "d.zarr"), report=str(tmp_path / "r"))

    @flow
    def renders_only():
        scan_dataset(opts.store, opts.data, None, opts.report)
        return run_demo_renders(opts, Store(opts.store))

    assert len(renders_only()) == 4
    attrs = Store(opts.store, mode="r").attrs("render/style/chow-zebra")
    assert attrs["inputs"] == [str(data / "tench.JPEG")] * 2
