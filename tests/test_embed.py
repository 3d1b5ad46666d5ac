"""Feature space: FAISS neighbours against numpy brute force on real fc7 features, altered copies,
t-SNE neighbourhoods, index round trips, the embed flow/CLI and the `neighbors` CLI."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import neurocat_cmd
from engine import faiss_index as fx
from engine.embedding import feature_space, layer_vectors
from engine.images import resize_crop
from engine.maps import grid_assignment, place_on_map
from flows.common import RunOptions
from flows.embed import embed_flow
from storage.indexes import read_index, write_index
from storage.store import Store
from tasks.embed import PIXELS

ALTERED = ["n01440764/n01440764_tench.JPEG", "n01560419/n01560419_bulbul.JPEG", "n02091831/n02091831_Saluki.JPEG",
           "n03026506/n03026506_Christmas_stocking.JPEG", "n03770679/n03770679_minivan.JPEG",
           "n04277352/n04277352_spindle.JPEG", "n07714571/n07714571_head_cabbage.JPEG"]


@pytest.fixture(scope="module")
def embedded(prefect_api, shared_images, tmp_path_factory):
    """The shared images through the embed flow once: store path, manifest, fc7 of usable rows, and
    fc7 centred on its mean (computed here in float64: the cosine space the job indexes and maps)."""
    out = tmp_path_factory.mktemp("embed")
    result = embed_flow(RunOptions(data=str(shared_images), store=str(out / "s.zarr"), report=str(out / "report")))
    store = Store(result["store"], mode="r")
    manifest = store.read_manifest()
    rows = np.flatnonzero(manifest["status"].values == "ok")
    feats = store.read("features/fc7")[rows].astype(np.float32)
    centred = (feats - feats.mean(axis=0, dtype=np.float64)).astype(np.float32)
    return {"result": result, "store": store, "manifest": manifest, "rows": rows, "feats": feats, "centred": centred,
            "out": out}


def brute_force(x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """k nearest other rows by a full float64 distance matrix."""
    x = x.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def find(manifest, suffix: str) -> int:
    return int(np.flatnonzero(manifest["path"].str.endswith(suffix))[0])


def altered_copy(path) -> Image.Image:
    """Downscaled to 60% and recompressed as JPEG quality 60."""
    img = Image.open(path).convert("RGB")
    img = img.resize((int(img.width * 0.6), int(img.height * 0.6)), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_exact_faiss_neighbours_equal_numpy_brute_force(embedded):
    store, rows, feats = embedded["store"], embedded["rows"], embedded["feats"]
    assert len(rows) == 250 and feats.shape == (250, 1280)
    want_pos, want_dist = brute_force(embedded["centred"], 10, "cosine")
    knn = store.read("embed/fc7/knn_index")[rows]
    assert store.attrs("embed/fc7")["kind"] == "flat" and store.attrs("embed/fc7")["metric"] == "cosine"
    assert np.array_equal(knn, rows[want_pos])  # stored graph holds dataset indices, nearest first
    np.testing.assert_allclose(store.read("embed/fc7/knn_dist")[rows], want_dist, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(store.read("embed/fc7/centre"), feats.mean(axis=0), rtol=1e-5, atol=1e-6)
    space = feature_space(feats, "flat", "l2", k=10, with_maps=False)
    want_pos, want_dist = brute_force(feats, 10, "l2")
    assert np.array_equal(space.knn_index, want_pos)
    np.testing.assert_allclose(space.knn_dist, want_dist, rtol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_self_join_equals_brute_force_across_blocks_and_duplicates(embedded, metric):
    feats = embedded["feats"]
    x = fx.prepare(feats, metric)
    ids, dist = fx.exact_self_join(x, 10, metric, block=64)  # 4 x 4 blocks, 10 of them computed
    want_pos, want_dist = brute_force(feats, 10, metric)
    assert np.array_equal(ids, want_pos)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-4, atol=1e-3)
    twins = np.concatenate([x, x[[3, 100, 249]]])  # exact duplicates: each other's nearest, at ~0
    ids, dist = fx.exact_self_join(twins, 3, metric, block=64)
    assert ids[[3, 100, 249], 0].tolist() == [250, 251, 252] and ids[250:, 0].tolist() == [3, 100, 249]
    assert np.all(dist[[3, 100, 249, 250, 251, 252], 0] < 1e-3 * np.median(dist[:, 0]))  # float32 rounding


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_altered_copy_and_original_are_mutual_nearest_neighbours(embedded, model, shared_images, metric):
    manifest, rows, feats = embedded["manifest"], embedded["rows"], embedded["feats"]
    crops = np.stack([resize_crop(altered_copy(shared_images / p), model.preprocessing) for p in ALTERED])
    copies = layer_vectors(model, torch.from_numpy(crops), "fc7")
    x = fx.prepare(np.concatenate([feats, copies]), metric, fx.cosine_centre(feats, metric))  # the job's space
    index = fx.build_index(x, "flat", metric)
    nn, _ = fx.knn_graph(index, x, 1, metric)
    position = {int(r): i for i, r in enumerate(rows)}
    for j, path in enumerate(ALTERED):
        original, copy = position[find(manifest, path)], len(feats) + j
        assert nn[copy, 0] == original, path
        assert nn[original, 0] == copy, path


def test_tsne_map_matches_scikit_learn_and_beats_pca(embedded):
    """Trustworthiness@10 of the stored map, measured independently in the map's own space
    (centred fc7, cosine), against scikit-learn's TSNE on the same unit vectors and against PCA."""
    from sklearn.manifold import TSNE, trustworthiness

    store, rows, space = embedded["store"], embedded["rows"], embedded["centred"]
    tsne, pca = store.read("embed/fc7/tsne")[rows], store.read("embed/fc7/pca")[rows]
    trust_tsne = trustworthiness(space, tsne, n_neighbors=10, metric="cosine")
    reference = TSNE(perplexity=30.0, init="pca", random_state=0).fit_transform(fx.prepare(space, "cosine"))
    assert trust_tsne >= trustworthiness(space, reference, n_neighbors=10, metric="cosine") - 0.02
    assert trust_tsne > trustworthiness(space, pca, n_neighbors=10, metric="cosine") + 0.05
    # the job ranks euclidean distances of float32 unit vectors, this cosine distances: a near
    # tie may swap, and one swapped rank moves the score by 2 / (n k (2n - 3k - 1)) = 1.7e-6
    n = len(rows)
    assert store.attrs("embed/fc7")["trust_tsne"] == pytest.approx(trust_tsne, abs=3 * 2 / (n * 10 * (2 * n - 31)))
    grid = store.read("embed/fc7/grid")
    assert sorted(grid[grid >= 0].tolist()) == rows.tolist()  # every image in exactly one cell


def test_default_uniform_affinities_keep_neighbourhoods_better_than_perplexity_30(embedded):
    """Why the map's affinities are uniform on the 15-NN graph: on the shared fc7 the stored map
    keeps more of each image's 10 nearest neighbours, and loses fewer (continuity), than the same
    pipeline with van der Maaten's Gaussian affinities of perplexity 30."""
    from sklearn.manifold import trustworthiness

    store, rows, space = embedded["store"], embedded["rows"], embedded["centred"]
    assert store.attrs("embed/fc7")["affinities"] == "uniform on the 15-NN graph"
    assert store.attrs(f"embed/{PIXELS}")["affinities"] is None  # no map of the pixel space
    ours = store.read("embed/fc7/tsne")[rows]
    gaussian = feature_space(embedded["feats"], "flat", "cosine", perplexity=30.0).tsne
    def trust(xy):
        return trustworthiness(space, xy, n_neighbors=10, metric="cosine")
    def continuity(xy):  # trustworthiness with the roles of the spaces swapped
        return trustworthiness(xy, fx.prepare(space, "cosine"), n_neighbors=10)
    assert trust(ours) > trust(gaussian) + 0.01, (trust(ours), trust(gaussian))
    assert continuity(ours) > continuity(gaussian), (continuity(ours), continuity(gaussian))


def test_stored_affinities_say_what_a_small_map_used():
    """On few points the neighbours are capped (half the others for uniform affinities, and
    perplexity (n - 1) / 3 for Gaussian ones); the store and report give the numbers the map
    was made with."""
    from engine.maps import describe_affinities

    assert describe_affinities(8, None) == "uniform on the 3-NN graph"
    assert describe_affinities(250, None) == "uniform on the 15-NN graph"
    assert describe_affinities(40, 30.0) == "Gaussian, perplexity 13"


@pytest.mark.xfail(strict=True, reason=(
    "measured trustworthiness@10 0.839-0.847 over 3 seeds in the job's space (fc7 centred on its mean, cosine) "
    "with the default uniform 15-NN affinities; Gaussian perplexity 30 0.80-0.81 (scikit-learn TSNE on it "
    "0.792-0.809 over 5 seeds), uniform 5-30 NN 0.80-0.86, PCA 0.674; before centring 0.737 (raw cosine, hub-ridden: "
    "10-NN occurrence skewness 3.0 vs 0.27 now), raw l2 0.625 (= Gaussian noise of the same shape). "
    "No neighbour embedding tried reaches 0.9: t-SNE perplexity 5-80, dof 0.2-1, exaggeration 1-2, 3000 "
    "iterations 0.75-0.81; mutual proximity 0.85-0.86 (O(N^2)); from the t-SNE map, t-NeRV (Venna et al. "
    "2010) lambda 0-1 at most 0.84, NeRV's precision term alone with rank-based input neighbourhoods 0.89 "
    "(2-D perplexity 20; 0.84-0.89 at 6-30). A 2-D layout with 0.93 exists (continuity 0.78, t-SNE's 0.79): "
    "the exact penalty minimised over the coordinates (soft top-10, annealed), i.e. fitting the metric itself"))
def test_tsne_map_trustworthiness_reaches_the_issue_target(embedded):
    from sklearn.manifold import trustworthiness

    store, rows, space = embedded["store"], embedded["rows"], embedded["centred"]
    assert trustworthiness(space, store.read("embed/fc7/tsne")[rows], n_neighbors=10, metric="cosine") >= 0.9


def test_the_stored_graph_is_the_same_bytes_whatever_the_blas_threads(embedded):
    """A Dask worker runs one BLAS thread, the threads runner all cores: the pixel space's graph
    (the same store, computed in processes started with 1 and with 2 threads) is the same bytes."""
    code = ("import sys, numpy as np; from storage.store import Store; from tasks.embed import space_vectors; "
            "from engine.embedding import feature_space; s = Store(sys.argv[1], mode='r'); "
            "rows = np.flatnonzero(s.read_manifest()['status'].values == 'ok'); "
            "sp = feature_space(space_vectors(s, 'thumbs', rows), 'flat', 'l2', 10, False); "
            "sys.stdout.buffer.write(sp.knn_index.tobytes() + sp.knn_dist.tobytes())")
    graphs = []
    for threads in ("1", "2"):
        env = {**os.environ, **{v: threads for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
        graphs.append(subprocess.run([sys.executable, "-c", code, str(embedded["store"].path)], env=env,
                                     capture_output=True, check=True).stdout)
    assert len(graphs[0]) == 250 * 10 * 12 and graphs[0] == graphs[1]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw"])
def test_index_save_load_round_trip_gives_same_answers(embedded, tmp_path, kind):
    x = fx.prepare(embedded["feats"], "l2")
    index = fx.build_index(x, kind, "l2")
    before = fx.search(index, x[:40], 10, "l2")
    store = Store(tmp_path / "r.zarr")
    write_index(store, f"fc7-{kind}", fx.serialize(index))
    loaded = fx.deserialize(read_index(store, f"fc7-{kind}"))
    assert fx.index_kind(loaded) == kind and loaded.ntotal == len(x)
    after = fx.search(loaded, x[:40], 10, "l2")
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_saved_flow_index_reproduces_the_stored_graph(embedded):
    store, rows = embedded["store"], embedded["rows"]
    index = fx.deserialize(read_index(store, "fc7"))
    ids = store.read("embed/fc7/ids")
    assert np.array_equal(ids, rows)
    metric = store.attrs("embed/fc7")["metric"]
    x = fx.prepare(embedded["feats"], metric, store.read("embed/fc7/centre"))
    graph, _ = fx.knn_graph(index, x, 10, metric)
    assert np.array_equal(ids[graph], store.read("embed/fc7/knn_index")[rows])


def test_recall_measures_missing_neighbours(embedded):
    x = fx.prepare(embedded["feats"], "l2")
    exact = brute_force(embedded["feats"], 10, "l2")[0]
    assert fx.measure_recall(exact, x, "l2") == 1.0
    damaged = exact.copy()
    damaged[:, 5:] = (exact[:, 5:] + 97) % len(x)  # half of every row replaced by (almost surely) wrong rows
    wrong_share = (damaged[:, 5:, None] == exact[:, None, :]).any(axis=2).mean() * 0.5
    assert fx.measure_recall(damaged, x, "l2") == pytest.approx(0.5 + wrong_share)
    for kind in ("ivf", "hnsw"):
        space = feature_space(embedded["feats"], kind, "l2", k=10, with_maps=False)
        assert space.recall == pytest.approx(fx.recall_at_k(space.knn_index, exact))
        assert space.recall >= 0.9, kind


def test_grid_assignment_recovers_a_shuffled_grid():
    rng = np.random.default_rng(0)
    rows, cols = 7, 8  # the near-square shape grid_assignment picks for 56 points
    gy, gx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    xy = np.stack([gx.ravel(), rows - 1 - gy.ravel()], 1) + rng.uniform(-0.2, 0.2, (rows * cols, 2))
    perm = rng.permutation(rows * cols)
    grid = grid_assignment(xy[perm] * 3.0, max_cells=1000)
    assert grid.shape == (rows, cols)
    assert np.array_equal(perm[grid], np.arange(rows * cols).reshape(rows, cols))


def test_new_images_land_near_their_originals_on_the_map(embedded, model, shared_images):
    store, manifest, rows = embedded["store"], embedded["manifest"], embedded["rows"]
    tsne, metric = store.read("embed/fc7/tsne"), store.attrs("embed/fc7")["metric"]
    crops = np.stack([resize_crop(altered_copy(shared_images / p), model.preprocessing) for p in ALTERED])
    copies = fx.prepare(layer_vectors(model, torch.from_numpy(crops), "fc7"), metric, store.read("embed/fc7/centre"))
    index = fx.deserialize(read_index(store, "fc7"))
    placed = place_on_map(tsne[rows], index, metric, copies)
    spread = np.median(np.linalg.norm(tsne[rows][:, None] - tsne[rows][None], axis=2))
    for j, path in enumerate(ALTERED):
        assert np.linalg.norm(placed[j] - tsne[find(manifest, path)]) < 0.1 * spread, path


def test_neighbors_cli_good_and_undecodable_query(embedded, shared_images, tmp_path):
    store = embedded["result"]["store"]
    good = tmp_path / "tench_copy.jpg"
    altered_copy(shared_images / ALTERED[0]).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes((shared_images / ALTERED[0]).read_bytes()[:300])
    no_prefect = ("import sys\nfrom neurocat.cli import main\nrc = main(sys.argv[1:])\n"
                  "assert 'prefect' not in sys.modules, 'neighbors imported prefect'\nsys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", no_prefect, "neighbors", "--store", store, "--query", str(good),
                          "-k", "5", "--place"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["query"] == str(good) and len(result["neighbors"]) == 5
    assert result["neighbors"][0]["path"] == ALTERED[0]
    dists = [n["distance"] for n in result["neighbors"]]
    assert dists == sorted(dists) and len(result["tsne_xy"]) == 2
    out = subprocess.run(neurocat_cmd() + ["neighbors", "--store", store, "--query", str(bad)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "broken.jpg" in out.stderr and "truncated" in out.stderr
    import shutil

    copy = tmp_path / "no_index.zarr"  # a store whose FAISS file is gone: one line, exit 2
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("*.index"))
    out = subprocess.run(neurocat_cmd() + ["neighbors", "--store", str(copy), "--query", str(good)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no FAISS index" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    # a store whose file list changed after embed (another job scanned a grown folder): its rows
    # would name other files, so neighbors refuses and the report skips the section, saying why
    from reports.site import Site, run_section

    moved = tmp_path / "moved.zarr"
    shutil.copytree(store, moved)
    changed = Store(str(moved))
    manifest = changed.read_manifest()
    changed.write_manifest(manifest.iloc[1:])
    out = subprocess.run(neurocat_cmd() + ["neighbors", "--store", str(moved), "--query", str(good)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "file list changed" in out.stderr and "Traceback" not in out.stderr, out.stderr
    status = run_section(Site(changed, tmp_path / "moved-report"), "embed")
    assert status.state == "skipped" and "another file list" in status.reason


def test_a_small_map_keeps_its_points_apart(embedded):
    """12 images: uniform affinities on all 11 others weigh every pair the same, and t-SNE put
    every point on one spot (|xy| ~ 1e-15); with at most half of them it is a map."""
    xy = feature_space(embedded["feats"][:12], "flat", "cosine").tsne
    gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1)[np.triu_indices(12, 1)]
    assert gaps.min() > 1e-3 and np.abs(xy).max() > 1


def test_approximate_indices_of_fewer_than_two_points_are_flat():
    assert fx.choose_kind(1, "ivfpq") == fx.choose_kind(0, "ivf") == "flat" and fx.choose_kind(2, "ivfpq") == "ivfpq"
    one = fx.prepare(np.ones((1, 8), np.float32), "l2")
    assert fx.index_kind(fx.build_index(one, "ivfpq", "l2")) == "flat"


def test_class_names_with_dollars_are_text_in_the_scatter_legend():
    from reports.sections.embed import scatter_figure

    fig = scatter_figure(np.arange(8, dtype=np.float32).reshape(4, 2), ["price_$5", "x$^$y", "$1_to_$2", "a"], "t", "")
    fig.savefig(io.BytesIO(), format="png")  # mathtext raised ValueError here
    shown = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert shown == {r"price_\$5", r"x\$^\$y", r"\$1_to_\$2", "a"}  # escaped: drawn as typed


def test_embed_flow_on_demo_data_with_a_skipped_file(prefect_api, demo_data, tmp_path):
    opts = RunOptions(data=str(demo_data), store=str(tmp_path / "d.zarr"))
    result = embed_flow(opts, index="hnsw", k=5)
    assert result["index"] == "hnsw" and result["k"] == 5 and result["images"] == 49
    store = Store(result["store"], mode="r")
    manifest = store.read_manifest()
    skipped = int(np.flatnonzero(manifest["status"].values != "ok")[0])
    knn = store.read("embed/fc7/knn_index")
    assert knn.shape == (50, 5) and (knn[skipped] == -1).all() and skipped not in knn
    assert np.isnan(store.read("embed/fc7/tsne")[skipped]).all()
    snake = find(manifest, "/n01740131_night_snake.jpg")
    copy = find(manifest, "copy_of_n01740131_night_snake.jpg")
    dist = store.read("embed/fc7/knn_dist")
    assert knn[copy, 0] == snake and knn[snake, 0] == copy  # the demo's near-duplicate pair
    assert dist[copy, 0] < 0.5 * np.nanmedian(dist[:, 0])
    assert store.read("embed/pixels/knn_index")[copy, 0] == snake
    html = (tmp_path / "d-report" / "embed.html").read_text()
    assert "t-SNE grid" in html and "hnsw" in html
    marker = tmp_path / "d.zarr" / "_shards" / "embed-fc7" / "0.json"
    stamp = marker.stat().st_mtime_ns
    embed_flow(opts, index="hnsw", k=5)
    assert marker.stat().st_mtime_ns == stamp  # a rerun with the same inputs skips the space


def test_embed_cli_rejects_bad_arguments(tmp_path, demo_data):
    for args in (["--layer", "no_such_layer"], ["-k", "0"]):
        out = subprocess.run(neurocat_cmd() + ["embed", "--data", str(demo_data), "--store", str(tmp_path / "x.zarr")]
                             + args, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
    out = subprocess.run(neurocat_cmd() + ["embed", "--data", str(demo_data), "--perplexity", "nan"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--perplexity: not a finite number: 'nan'" in out.stderr, out.stderr
    out = subprocess.run(neurocat_cmd() + ["neighbors", "--store", str(tmp_path / "none.zarr"), "--query", "x.jpg"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no neurocat store" in out.stderr
