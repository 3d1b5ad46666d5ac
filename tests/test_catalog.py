"""`neurocat catalog` on the shared images: top-K against an independent brute force, patches,
statistics, resume, the atlas, activation maps, exact windowed projections, runners agreeing,
and CLI errors."""

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conftest import neurocat_cmd
from engine.catalog import (crop_boxes, extract_patches, patch_geometry, project_units, projection_windows, square_boxes,
                            to_uint8_hwc)
from engine.errors import InputError
from engine.fast import FastOptions, fast_module
from engine.images import list_images
from engine.inference import run_layers, run_model
from engine.receptive_field import RF, receptive_fields
from engine.truncate import UptoModel, upto_module
from flows.catalog import (ACTIVATION_IMAGES, BLOCK_BYTES, FEATVIS_JOB, JOB, UNIT_CHUNK, activation_map_rows,
                           catalog_flow, channel_blocks, check_activation_images, unit_output_bytes)
from flows.common import RunOptions
from storage.store import Store

LAYERS = ("_blocks.2", "_blocks.5")
LIMIT, K, KB = 64, 8, 4
OPTS = dict(limit=LIMIT, shard_size=16, batch_size=16)
ARRAYS = [f"catalog/{layer}/{name}" for layer in LAYERS for name in (
    "top_value", "top_index", "top_yx", "bottom_value", "bottom_index", "bottom_yx", "top_patch", "bottom_patch",
    "overlay", "projection", "activation_maps", "stats/mean", "stats/std", "stats/max", "stats/rate", "stats/hist",
    "stats/selectivity")]


def run(tmp, name, shared_images, runner="threads"):
    from flows.runners import task_runner

    opts = RunOptions(data=str(shared_images), store=str(tmp / f"{name}.zarr"), report=str(tmp / f"{name}-report"),
                      runner=runner, **OPTS)
    flow = catalog_flow.with_options(task_runner=task_runner(runner))
    return flow(opts, LAYERS, top_k=K, bottom_k=KB, projections=4)


@pytest.fixture(scope="module")
def catalog(prefect_api, shared_images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalog")
    result = run(tmp, "threads", shared_images)
    return tmp, result, Store(result["store"], mode="r")


@pytest.fixture(scope="module")
def brute(shared_images, model):
    """Spatial max of every channel per image, from PIL + torchvision transforms and plain forward hooks."""
    prep = model.preprocessing
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(prep.mean, prep.std)])
    paths = [shared_images / e.path for e in list_images(shared_images)][:LIMIT]
    outputs = {layer: [] for layer in LAYERS}
    handles = [model.module.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out, layer=layer: outputs[layer].append(out.detach())) for layer in LAYERS]
    try:
        with torch.no_grad():
            for i in range(0, len(paths), 8):
                model.module(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + 8]]))
    finally:
        for h in handles:
            h.remove()
    images = [np.array(T.CenterCrop(224)(T.Resize(256)(Image.open(p).convert("RGB")))) for p in paths]
    maps = {layer: torch.cat(v).numpy() for layer, v in outputs.items()}
    return {"maps": maps, "score": {k: v.reshape(v.shape[0], v.shape[1], -1).max(2) for k, v in maps.items()},
            "images": images}


def expected_ranking(score: np.ndarray, k: int, descending: bool) -> np.ndarray:
    """[C, k] image indices by score, then lower index (a plain Python sort per channel)."""
    n = score.shape[0]
    return np.array([sorted(range(n), key=lambda i: (-score[i, c] if descending else score[i, c], i))[:k]
                     for c in range(score.shape[1])])


def assert_same_ranking(got: np.ndarray, want: np.ndarray, score: np.ndarray, tol: float = 1e-4):
    """Equal index lists, except that images whose scores differ by float noise may swap places."""
    for c in range(got.shape[0]):
        for g, w in zip(got[c], want[c]):
            assert g == w or abs(score[g, c] - score[w, c]) <= tol * max(1.0, abs(score[w, c])), (c, got[c], want[c])


def test_top_and_bottom_k_equal_brute_force(catalog, brute):
    _, result, store = catalog
    assert set(result["layers"]) == set(LAYERS)
    for layer in LAYERS:
        score = brute["score"][layer]
        top = store.read(f"catalog/{layer}/top_index")
        assert top.shape == (score.shape[1], K)
        assert_same_ranking(top, expected_ranking(score, K, True), score)
        assert_same_ranking(store.read(f"catalog/{layer}/bottom_index"), expected_ranking(score, KB, False), score)
        values = store.read(f"catalog/{layer}/top_value")
        assert np.allclose(values, np.take_along_axis(score.T, top, 1), rtol=1e-4, atol=1e-4)
        assert np.allclose(store.read(f"catalog/{layer}/stats/mean"), score.mean(0), rtol=1e-4, atol=1e-4)
        assert np.allclose(store.read(f"catalog/{layer}/stats/max"), score.max(0), rtol=1e-4, atol=1e-4)
        # firing rate over every position of every image (eager and fast forms may round an
        # activation near 0 to opposite signs: a few of the 5*10^4-2*10^5 per unit here)
        rate = store.read(f"catalog/{layer}/stats/rate")
        assert np.allclose(rate, (brute["maps"][layer] > 0).mean(axis=(0, 2, 3)), rtol=0, atol=1e-4)
        assert rate.min() < 0.9  # unlike the fraction of images with score > 0, which is 1 for most units
        # the argmax position is the brute-force map's argmax
        yx = store.read(f"catalog/{layer}/top_yx")
        maps = brute["maps"][layer]
        for c in range(0, score.shape[1], 7):
            i, (y, x) = top[c, 0], yx[c, 0]
            assert maps[i, c, y, x] == pytest.approx(maps[i, c].max(), rel=1e-4, abs=1e-4)
        attrs = store.attrs(f"catalog/{layer}/top_index")
        assert attrs["model"] == "efficientnet_lite0" and len(attrs["weights_sha256"]) == 64
        stats = store.attrs(f"catalog/{layer}/stats")
        assert len(stats["quantiles"]) == score.shape[1] and len(stats["class_selectivity"]) == score.shape[1]


def test_patches_are_the_receptive_field_of_the_argmax(catalog, brute, model):
    _, _, store = catalog
    rfs = receptive_fields(model)
    layer = "_blocks.5"
    top, yx = store.read(f"catalog/{layer}/top_index"), store.read(f"catalog/{layer}/top_yx")
    patches = store.read(f"catalog/{layer}/top_patch")
    size = patches.shape[2]
    checked = 0
    for c in range(patches.shape[0]):
        y0, x0, y1, x1 = rfs[layer].box(*yx[c, 0], 224, 224)
        if (y1 - y0, x1 - x0) != rfs[layer].size:
            continue  # border boxes are padded; interior ones are a plain resize of the crop
        crop = Image.fromarray(brute["images"][top[c, 0]][y0:y1, x0:x1]).resize((size, size), Image.BILINEAR)
        assert np.abs(patches[c, 0].astype(int) - np.asarray(crop, int)).mean() < 4, c
        checked += 1
    assert checked >= 5
    assert store.read(f"catalog/{layer}/projection").shape[0] == 4
    assert store.read(f"catalog/{layer}/projection")[0].std() > 0
    assert store.has("catalog/first_layer_filters")


def test_atlas_pages(catalog):
    tmp, result, store = catalog
    site = tmp / "threads-report"
    index = (site / "catalog" / "index.html").read_text()
    for layer in LAYERS:
        assert layer in index
        units = store.read(f"catalog/{layer}/top_index").shape[0]
        assert len(list((site / "catalog" / layer).glob("unit-*.html"))) == units
        page = (site / "catalog" / layer / "unit-0.html").read_text()
        top = store.read(f"catalog/{layer}/top_index")[0]
        paths = Store(result["store"]).read_manifest()["path"]
        assert paths.iloc[top[0]] in page and "Bottom 4 images" in page
        for order in ("unit", "selectivity", "rate"):
            assert (site / "catalog" / layer / f"units-{order}-1.html").exists()
    assert "Catalogue" in (site / "index.html").read_text()


def test_resumed_run_reloads_shard_states_and_ends_identical(catalog, shared_images, monkeypatch):
    """...and its patch pass, split into three blocks instead of one, writes the same patches."""
    tmp, result, store = catalog
    monkeypatch.setattr("flows.catalog.BLOCK_BYTES", 16 << 20)  # 40 MB of outputs: 3 blocks
    copy = tmp / "resumed.zarr"
    shutil.copytree(result["store"], copy)
    markers = copy / "_shards" / JOB
    (markers / "1.json").unlink()  # shard 1 is redone, shards 0, 2, 3 are reloaded from their npz
    stamp = (markers / "0.npz").stat().st_mtime_ns
    for name in ARRAYS:  # the reduced statistics must be rebuilt from the shard states
        if not name.endswith(("_patch", "overlay", "projection")):
            Store(copy).delete(name)
    again = run(tmp, "resumed", shared_images)
    assert (markers / "0.npz").stat().st_mtime_ns == stamp
    assert len(list((copy / "_shards" / "catalog-patches").glob("*.json"))) == 3
    for name in ARRAYS:
        assert np.array_equal(store.read(name), Store(again["store"]).read(name), equal_nan=True), name


def test_feature_visualisations_resume_from_their_markers(catalog, shared_images, monkeypatch):
    """A rerun renders only the batches of units whose marker is missing (every one was
    rendered again before): a kept batch keeps what it wrote, a redone one writes the same."""
    tmp, result, _ = catalog
    monkeypatch.setattr("flows.catalog.FEATVIS_SIZE", 32)
    monkeypatch.setattr("flows.catalog.FEATVIS_STEPS", 4)
    copy = tmp / "featvis.zarr"
    shutil.copytree(result["store"], copy)
    opts = RunOptions(data=str(shared_images), store=str(copy), report=str(tmp / "featvis-report"), **OPTS)

    def featvis():
        catalog_flow(opts, LAYERS, top_k=K, bottom_k=KB, projections=4, featvis_n=3)
        return [Store(copy).read(f"catalog/{layer}/featvis") for layer in LAYERS]

    first = featvis()
    assert all(f.shape == (3, 32, 32, 3) and f.any() for f in first)
    markers = copy / "_shards" / FEATVIS_JOB
    assert sorted(p.name for p in markers.glob("*.json")) == ["0.json", "1.json"]  # a batch per layer
    kept = np.full((1, 32, 32, 3), 7, np.uint8)
    Store(copy).write_rows(f"catalog/{LAYERS[0]}/featvis", 0, kept)  # not redone: stays
    Store(copy).write_rows(f"catalog/{LAYERS[1]}/featvis", 0, np.zeros((3, 32, 32, 3), np.uint8))
    (markers / "1.json").unlink()  # redone
    again = featvis()
    assert np.array_equal(again[0][0], kept[0]) and np.array_equal(again[0][1:], first[0][1:])
    assert np.array_equal(again[1], first[1])


def test_channel_blocks_cover_every_unit_once_within_the_byte_bound():
    crop, slots = 224, 24
    unit = {"_blocks.5": unit_output_bytes(83, slots, crop, True), "_blocks.10": unit_output_bytes(112, slots, crop, True),
            "_conv_head": unit_output_bytes(112, slots, crop, False)}
    channels = {"_blocks.5": 80, "_blocks.10": 112, "_conv_head": 1280}
    assert len(channel_blocks({k: channels[k] for k in ("_blocks.5", "_blocks.10")}, unit)) == 1  # the defaults
    blocks = channel_blocks(channels, unit)
    assert len(blocks) == 6  # 1.3 GB of outputs, 256 MB a block
    for layer, c in channels.items():
        edges = [b[layer] for b in blocks]
        assert edges[0][0] == 0 and edges[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))  # contiguous, no unit twice
        assert all(c0 % UNIT_CHUNK == 0 for c0, _ in edges)  # no two blocks write one chunk
    slack = sum(UNIT_CHUNK * u for u in unit.values())  # block sizes round up to whole chunks
    assert all(sum((c1 - c0) * unit[k] for k, (c0, c1) in b.items()) <= BLOCK_BYTES + slack for b in blocks)


@pytest.mark.slow  # starts a LocalCluster whose worker loads the model: minutes on a busy 2-core machine
def test_threads_and_dask_give_the_same_catalogue(catalog, shared_images):
    tmp, _, store = catalog
    other = Store(run(tmp, "dask", shared_images, runner="dask")["store"], mode="r")
    for name in ARRAYS:
        assert np.array_equal(store.read(name), other.read(name), equal_nan=True), name


def test_cli_rejects_bad_layers_and_k(tmp_path, shared_images):
    for args in (["--layers", "_blocks.99"], ["--top-k", "0"], ["--layers", " , "]):
        out = subprocess.run(neurocat_cmd() + ["catalog", "--data", str(shared_images), "--store",
                                               str(tmp_path / "x.zarr"), "--json"] + args,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and out.stdout == ""


def test_activation_images_not_in_the_dataset_are_refused_before_the_flow(tmp_path, demo_data):
    """`--activation-images` paths that are not in the dataset were found out inside the flow,
    after the scan had hashed every file, so Prefect printed the flow's traceback before the
    one-line error: now a listing of the data folder tells before the flow starts."""
    first = list_images(demo_data)[0].path
    store = tmp_path / "c.zarr"
    out = subprocess.run(neurocat_cmd() + ["catalog", "--data", str(demo_data), "--store", str(store), "--limit", "2",
                                           "--activation-images", f"{first},n01440764/no_such.jpg"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr == ("neurocat: error: --activation-images: not in the dataset: n01440764/no_such.jpg "
                          "(give paths relative to --data)\n")
    assert not store.exists()


def test_activation_images_are_checked_against_the_files_the_scan_lists(demo_data):
    """The check before the flow sees the paths as the manifest names them, --limit applied."""
    first, second = [e.path for e in list_images(demo_data)[:2]]
    check_activation_images(RunOptions(data=str(demo_data), limit=2), [second, first])
    with pytest.raises(InputError, match=f"not in the dataset: {second}"):
        check_activation_images(RunOptions(data=str(demo_data), limit=1), [second])


def test_activation_maps_equal_the_hooked_layer_output(catalog, brute):
    """Every unit's map on the first images, against the eager model's forward hooks (the `brute` fixture)."""
    tmp, _, store = catalog
    rows = store.attrs("catalog/activation_inputs")["image_index"]
    assert rows == list(range(ACTIVATION_IMAGES))
    inputs = store.read("catalog/activation_inputs")
    assert np.abs(inputs.astype(int) - np.stack(brute["images"][:len(rows)]).astype(int)).mean() < 1
    page = (tmp / "threads-report" / "catalog" / "activations.html").read_text()
    for layer in LAYERS:
        maps = store.read(f"catalog/{layer}/activation_maps")
        want = brute["maps"][layer][rows]
        assert maps.dtype == np.float16 and maps.shape == want.shape
        assert np.allclose(maps.astype(np.float32), want, rtol=1e-3, atol=1e-3), np.abs(maps - want).max()
        assert store.attrs(f"catalog/{layer}/activation_maps")["image_index"] == rows
        assert page.count(f'href="{layer}/unit-') == len(rows) * want.shape[1]  # every tile links to its unit
    assert len(list((tmp / "threads-report" / "catalog" / "activations").glob("*.png"))) == len(rows) * len(LAYERS)


def test_activation_images_by_count_or_path():
    manifest = pd.DataFrame({"path": ["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg"],
                             "status": ["ok", "skipped", "ok", "ok"]})
    assert activation_map_rows(manifest, 2) == [0, 2]
    assert activation_map_rows(manifest, 0) == []
    assert activation_map_rows(manifest, ["b/4.jpg", "a/1.jpg", "b/4.jpg"]) == [3, 0]
    with pytest.raises(InputError, match="c/9.jpg"):
        activation_map_rows(manifest, ["a/1.jpg", "c/9.jpg"])


def test_run_layers_equals_run_model_and_stops_at_the_layer(brute, model):
    x = model.preprocessing.normalize(torch.from_numpy(np.stack(brute["images"][:4])))
    _, full = run_model(model, x, ["_blocks.5"])
    assert torch.equal(run_layers(model, x, ["_blocks.5"])["_blocks.5"], full["_blocks.5"])
    cut = upto_module(model, ("_blocks.5",)).graph
    assert not any("_conv_head" in str(n.target) for n in cut.graph.nodes)  # nothing after the layer runs
    eager = UptoModel(fast_module(model, ("_blocks.5",), options=FastOptions.off()))
    with torch.inference_mode():
        got = eager(x)["_blocks.5"]
    assert torch.allclose(got, full["_blocks.5"], atol=1e-3, rtol=1e-3)  # the eager fallback stops by raising


def test_projection_windows_give_the_whole_image_projection(brute, model):
    """Guided backprop on receptive-field windows is exact: the same bytes as on the whole image,
    for interior units and units at every border (clipped fields)."""
    layer, rf = "_blocks.5", receptive_fields(model)["_blocks.5"]
    images = np.stack(brute["images"][:8])
    yx = np.array([[0, 0], [13, 13], [0, 13], [13, 0], [1, 12], [7, 7], [5, 9], [12, 3]])
    channels = np.array([3, 10, 17, 24, 31, 38, 45, 79])
    windows = projection_windows(rf, yx, 224, 224)
    assert len(np.unique(windows[:, 2:] - windows[:, :2], axis=0)) <= 4  # they batch by shape
    assert ((windows[:, 2:] - windows[:, :2]) < 100).all()
    boxes = square_boxes(rf, (14, 14), 224, 224)
    expected = brute["maps"][layer][np.arange(8), channels, yx[:, 0], yx[:, 1]]
    whole = project_units(model, layer, images, channels, yx, boxes, 83)
    windowed = project_units(model, layer, images, channels, yx, boxes, 83, rf=rf, expected=expected)
    assert np.array_equal(whole, windowed)
    assert all(p.std() > 0 for p in whole)
    off = expected + np.isin(np.arange(8), [2, 5])  # two units whose windows "miss": redone on the whole image
    assert np.array_equal(whole, project_units(model, layer, images, channels, yx, boxes, 83, rf=rf, expected=off))


@pytest.mark.parametrize("layer", ["_blocks.5", "_blocks.10", "field 151"])
def test_pooled_patches_equal_roi_align_bit_for_bit(brute, model, layer):
    """`extract_patches` copies or pools the image once per box phase; `crop_boxes` (roi_align,
    one call per box) is the reference, at every position of a field smaller than the patch
    limit, one larger than the image, and one whose box grows to a multiple of the factor."""
    rf = RF((151, 151), (8, 8), (-60, -60)) if layer == "field 151" else receptive_fields(model)[layer]
    side, size = patch_geometry(rf, 224)
    assert (side, size) == {"_blocks.5": (83, 83), "_blocks.10": (224, 112), "field 151": (152, 76)}[layer]
    images = np.stack(brute["images"][:6])
    boxes = square_boxes(rf, (14, 14), 224, 224)
    grid = np.stack(np.meshgrid(np.arange(14), np.arange(14), indexing="ij"), -1).reshape(-1, 2)
    yx, rows = np.repeat(grid, 6, 0), np.tile(np.arange(6), len(grid))
    got = extract_patches(images, rows, yx, boxes, size)
    box = boxes[yx[:, 0], yx[:, 1]]
    want = to_uint8_hwc(crop_boxes(torch.from_numpy(images).permute(0, 3, 1, 2).float(), rows, box, size))
    assert np.array_equal(got, want)
    assert (box[:, 2:] - box[:, :2] == side).all() and (got == 128).all(-1).any()  # squared, grey borders


def test_k_beyond_the_dataset_is_clamped_to_it(prefect_api, demo_data, tmp_path):
    """--top-k 100000 on 3 images sized the patch arrays by K (30 GiB for 16 images) and died;
    K is now at most the dataset's size, and the catalogue equals one made with that K."""
    opts = RunOptions(data=str(demo_data), store=str(tmp_path / "k.zarr"), report=str(tmp_path / "k-report"),
                      limit=3, shard_size=3)
    catalog_flow(opts, ["_blocks.1"], top_k=100_000, bottom_k=100_000, projections=0, activation_images=0)
    store = Store(opts.store, mode="r")
    assert store.attrs("catalog/_blocks.1/stats")["top_k"] == 3
    top = store.read("catalog/_blocks.1/top_index")
    assert top.shape[1] == 3 and (np.sort(top, axis=1) == np.arange(3)).all()  # each image once per unit


def test_activation_grid_shows_both_signs_of_a_linear_layer(catalog):
    """_blocks.5 ends in a linear projection: about half of its values are below zero. The grid
    colours them blue by their depth (they were black, like zero), values above zero as before."""
    from engine.atlas import NEGATIVE_BLUE, activation_grid, activation_layout, inferno_lut, tile_boxes

    _, _, store = catalog
    maps = store.read("catalog/_blocks.5/activation_maps")[0].astype(np.float32)
    peak = store.read("catalog/_blocks.5/stats/max")
    assert 0.3 < (maps < 0).mean() < 0.7
    grid = activation_grid(maps, peak).astype(np.float32)
    c, h, w = maps.shape
    scale, cols = activation_layout(c, h, w)
    lut = inferno_lut()
    for u, (x0, y0, _, _) in enumerate(tile_boxes(c, h * scale, w * scale, cols, 2)):
        cells = grid[y0:y0 + h * scale:scale, x0:x0 + w * scale:scale]  # one pixel per map cell
        level = maps[u] / peak[u]
        want = np.where((level < 0)[..., None], np.clip(-level, 0, 1)[..., None] * NEGATIVE_BLUE,
                        lut[np.round(np.clip(level, 0, 1) * 255).astype(int)])
        assert np.abs(cells - want).max() <= 0.5, u


def test_the_logits_are_catalogued_with_their_projections(prefect_api, demo_data, tmp_path):
    """`--layers logits` (a documented alias, a [B, C] output) crashed in the projection pass
    indexing a 2-D output with a position; a class unit's projection is its input gradient."""
    opts = RunOptions(data=str(demo_data), store=str(tmp_path / "l.zarr"), report=str(tmp_path / "l-report"),
                      limit=3, shard_size=3)
    catalog_flow(opts, ["logits"], top_k=2, bottom_k=1, projections=2, activation_images=0)
    store = Store(opts.store, mode="r")
    projection = store.read("catalog/_fc/projection")
    assert projection.shape[0] == 2 and all(p.std() > 0 for p in projection)
    assert store.read("catalog/_fc/top_yx").max() == 0  # the one position of a [C] output
