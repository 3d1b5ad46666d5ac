"""Dataset audit on arrays: duplicates, label issues, outliers, imbalance, unit bias, drift.

Pure NumPy/FAISS (plus one torch function for context reliance); no Prefect, no files.
Inputs are what the shared forward pass stores: fc7 features [N, D], logits [N, 1000],
thumbnails uint8 [N, 64, 64, 3], and the manifest's paths, hashes, labels and splits.

Every finding carries a stable id: a hash of its kind and the paths (or class / unit) it
is about, so two audits can say which findings are new, resolved or persisting, and a
rerun on unchanged data gives identical findings (everything here is deterministic:
exact search below engine/faiss_index's flat-index size, stable sorts, fixed seeds).

Near-duplicate thresholds are calibrated per model (DESIGN.md, "Known pitfalls"): the
similarity of images to augmented copies of themselves (positives) against the
similarity of distinct dataset images (negatives); the threshold is where the expected
number of false pairs in this dataset, from an exponential fit to the negatives' upper
tail, drops below a target, and the expected false-positive rate and recall are
reported beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import faiss
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.stats import hypergeom

from engine import faiss_index
from engine.errors import InputError

KINDS = ("near_duplicates", "label_issues", "outliers", "context_reliance", "unit_bias")
HASH_BITS = 64
MAX_HASH_DISTANCE = 10  # beyond this a 64-bit dHash no longer says "same picture"
SAME_HASH = 4  # pairs this close are rescaled / recompressed copies, not distinct images
AUGMENTATIONS = ("resize_jpeg", "jpeg", "crop")
MAX_NEIGHBOURS = 1024  # the most neighbours one near-duplicate search asks for (GPU FAISS: k <= 2048)


# ---- ids --------------------------------------------------------------------------------
def finding_id(kind: str, *keys: object) -> str:
    """Stable id of a finding: hash of its kind and what it is about (paths, class, unit)."""
    blob = json.dumps([kind, *keys], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- features and perceptual hashes -----------------------------------------------------
def unit_rows(features: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (all-zero rows stay zero)."""
    x = np.asarray(features, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norm, 1e-12))


def dhash(thumbs: np.ndarray) -> np.ndarray:
    """64-bit difference hash of each uint8 [N, H, W, 3] thumbnail -> uint8 [N, 8].

    Grey levels area-averaged to 8 x 9; bit = "brighter than its left neighbour". Robust to
    rescaling and recompression, not to crops (which the fc7 cosine catches instead).
    """
    t = torch.from_numpy(np.asarray(thumbs)).float()
    grey = (t * torch.tensor([0.299, 0.587, 0.114])).sum(-1)[:, None]
    small = F.adaptive_avg_pool2d(grey, (8, 9))[:, 0]
    bits = (small[:, :, 1:] > small[:, :, :-1]).flatten(1).numpy()
    return np.packbits(bits, axis=1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between packed hashes a [..., 8] and b [..., 8]."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(-1).astype(np.int32)


# ---- augmented copies for calibration ---------------------------------------------------
def augmented_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """What a near-duplicate usually is: rescaled and recompressed, recompressed, or cropped."""
    w, h = img.size
    if kind == "resize_jpeg":
        s = rng.uniform(0.4, 0.7)
        img = img.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BILINEAR)
    if kind in ("resize_jpeg", "jpeg"):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(25, 60)))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop":
        f = rng.uniform(0.03, 0.10)
        left, top = round(w * f * rng.uniform()), round(h * f * rng.uniform())
        img = img.crop((left, top, left + round(w * (1 - f)), top + round(h * (1 - f))))
    return img


def calibration_sample(sha256: Sequence[str], usable: np.ndarray, n: int) -> np.ndarray:
    """Indices of the calibration images: the first `n` usable ones in content-hash order
    (spread over the dataset, independent of file names, the same on a rerun)."""
    idx = np.flatnonzero(usable)
    order = np.argsort(np.asarray(sha256, dtype=object)[idx].astype(str), kind="stable")
    return np.sort(idx[order[:n]])


# ---- calibration ------------------------------------------------------------------------
@dataclass
class Threshold:
    """One calibrated duplicate signal: flag a pair when its similarity >= value."""

    signal: str
    value: float
    fpr: float  # expected fraction of distinct-image pairs at or above `value`
    expected_false_pairs: float  # fpr x the number of pairs in this dataset
    observed_negatives: int  # calibration negatives at or above `value`
    negatives: int
    recall: float | None  # fraction of augmented copies at or above `value`
    recall_by_kind: dict = field(default_factory=dict)


def tail_fpr(negatives: np.ndarray, tail: float = 0.01, min_tail: int = 50):
    """Exceedance probability P(s >= t) of distinct pairs: empirical in the bulk, an
    exponential fit to the top `tail` fraction (at least `min_tail` pairs) above (peaks over
    threshold; the scale from the median excess, so the few true duplicates a dataset may
    hold among its "distinct" pairs barely move it)."""
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    if not len(neg):  # one usable image, or only copies of one picture: no distinct pair can be a false one
        return (lambda t: 0.0), math.inf, 1e-6
    tail = min(max(tail, min_tail / max(len(neg), 1)), 0.5)
    u = float(np.quantile(neg, 1 - tail))
    above = neg[neg > u]
    frac = len(above) / max(len(neg), 1)
    scale = max(float(np.median(above - u)) / math.log(2), 1e-6) if len(above) else 1e-6

    def fpr(t: float) -> float:
        if t <= u:
            return float(1 - np.searchsorted(neg, t, side="left") / max(len(neg), 1))
        return frac * math.exp(-(t - u) / scale)

    return fpr, u, scale


def calibrate_signal(signal: str, positives: np.ndarray, pos_kinds: np.ndarray, negatives: np.ndarray,
                     pairs_in_dataset: int, max_false_pairs: float, candidates: np.ndarray) -> Threshold:
    """The lowest candidate threshold whose expected false pairs in the dataset is at most
    `max_false_pairs`; recall measured on the augmented copies."""
    fpr, _, _ = tail_fpr(negatives)
    chosen = candidates[-1]
    for t in candidates:
        if fpr(float(t)) * pairs_in_dataset <= max_false_pairs:
            chosen = t
            break
    t = float(chosen)
    rate = fpr(t)
    by_kind = {str(k): round(float((positives[pos_kinds == k] >= t).mean()), 4) for k in np.unique(pos_kinds)}
    return Threshold(signal, t, rate, rate * pairs_in_dataset, int((negatives >= t).sum()), int(len(negatives)),
                     float((positives >= t).mean()) if len(positives) else None, by_kind)


def negative_pairs(unit: np.ndarray, hashes: np.ndarray, usable: np.ndarray, sha256: Sequence[str],
                   max_images: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and hash similarity of distinct-image pairs (different content hash) among up
    to `max_images` usable images (a fixed-seed sample), all pairs."""
    idx = np.flatnonzero(usable)
    if len(idx) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_images, replace=False))
    sims = unit[idx] @ unit[idx].T
    a, b = np.triu_indices(len(idx), 1)
    sha = np.asarray(sha256, dtype=object)[idx]
    keep = sha[a] != sha[b]
    a, b = a[keep], b[keep]
    return sims[a, b], -hamming(hashes[idx][a], hashes[idx][b]).astype(np.float64)


def calibrate(pos_cos: np.ndarray, pos_hash: np.ndarray, pos_kinds: np.ndarray, neg_cos: np.ndarray,
              neg_hash: np.ndarray, n_images: int, max_false_pairs: float = 0.5) -> dict:
    """Thresholds for both duplicate signals (hash similarity is minus the Hamming distance).

    The cosine is calibrated on negatives whose hashes differ in more than SAME_HASH bits
    (closer ones are the same picture), the hash on negatives the cosine does not call
    duplicates; the hash threshold is never looser than MAX_HASH_DISTANCE bits."""
    pairs = max(n_images * (n_images - 1) // 2, 1)
    distinct = neg_hash < -SAME_HASH
    cos = calibrate_signal("fc7_cosine", pos_cos, pos_kinds, neg_cos[distinct], pairs, max_false_pairs,
                           np.round(np.arange(0.30, 1.0001, 0.005), 3))
    clean = neg_hash[neg_cos < cos.value]
    hsh = calibrate_signal("dhash", pos_hash, pos_kinds, clean, pairs, max_false_pairs,
                           -np.arange(MAX_HASH_DISTANCE, -1, -1, dtype=np.float64))
    either = (pos_cos >= cos.value) | (pos_hash >= hsh.value)
    return {"fc7_cosine": asdict(cos), "dhash": asdict(hsh),
            "recall_either": float(either.mean()) if len(either) else None,
            "recall_either_by_kind": {str(k): round(float(either[pos_kinds == k].mean()), 4)
                                      for k in np.unique(pos_kinds)},
            "max_false_pairs": max_false_pairs, "pairs_in_dataset": pairs, "positives": int(len(pos_cos))}


# ---- duplicates ---------------------------------------------------------------------------
def _cosine(dist: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit vectors from faiss_index's Euclidean distance sqrt(2 - 2 cos)."""
    return 1.0 - dist.astype(np.float64) ** 2 / 2


def similar_pairs(unit: np.ndarray, rows: np.ndarray, threshold: float, k: int = 16, kind: str = "auto"
                  ) -> np.ndarray:
    """All pairs (i < j) of `rows` with cosine >= threshold, by k-nearest-neighbour search in
    engine/faiss_index (flat, IVF or HNSW by size; on the GPU when there is one), so memory
    and time grow with N x k, not N^2. A row whose k-th neighbour still passes is searched
    again with twice the k (up to MAX_NEIGHBOURS, within what a GPU index returns), so on an
    exact (flat) index this is the complete range search; a row with more near copies
    than that still joins their cluster through the pairs found."""
    if len(rows) < 2:
        return np.zeros((0, 2), np.int64)
    x = faiss_index.prepare(unit[rows], "cosine")
    index = faiss_index.build_index(x, kind, "cosine")
    found: list[np.ndarray] = []
    pending = np.arange(len(rows))
    while len(pending):
        k_now = min(k, len(rows) - 1, MAX_NEIGHBOURS)
        ids, dist = faiss_index.search(index, x[pending], k_now + 1, "cosine")
        hit = (_cosine(dist) >= threshold - 1e-6) & (ids >= 0) & (ids != pending[:, None])
        q, j = np.nonzero(hit)
        found.append(np.stack([pending[q], ids[q, j]], 1))
        full = hit.sum(1) >= k_now  # every other row returned passed (self may sit anywhere among ties)
        pending = pending[full] if k_now < min(len(rows) - 1, MAX_NEIGHBOURS) else pending[:0]
        k *= 2
    pairs = np.unique(np.sort(np.concatenate(found), axis=1), axis=0)
    return rows[pairs] if len(pairs) else np.zeros((0, 2), np.int64)


def range_pairs_hash(hashes: np.ndarray, rows: np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs (i < j) of `rows` whose hashes differ in at most `max_distance` bits."""
    if max_distance < 0 or not len(rows):
        return np.zeros((0, 2), np.int64)
    index = faiss.IndexBinaryFlat(HASH_BITS)
    codes = np.ascontiguousarray(hashes[rows])
    index.add(codes)
    lims, _, found = index.range_search(codes, int(max_distance) + 1)
    q = np.repeat(np.arange(len(rows)), np.diff(lims).astype(np.int64))
    keep = q < found
    return np.stack([rows[q[keep]], rows[found[keep]]], 1) if keep.any() else np.zeros((0, 2), np.int64)


def exact_pairs(sha256: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """Pairs of rows with the same content hash (each joined to the first of its group)."""
    df = pd.DataFrame({"row": rows, "sha": np.asarray(sha256, dtype=object)[rows]})
    first = df.groupby("sha")["row"].transform("min")
    dup = df["row"] != first
    return np.stack([first[dup].to_numpy(), df.loc[dup, "row"].to_numpy()], 1).astype(np.int64)


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components (union-find) of the pair graph: a label per row."""
    graph = sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def duplicate_findings(unit: np.ndarray, hashes: np.ndarray, manifest: pd.DataFrame, usable: np.ndarray,
                       cos_threshold: float, hash_threshold: int) -> list[dict]:
    """Exact (same bytes) and near (fc7 cosine or dHash) duplicates, grouped into clusters.

    A cluster's `score` is the lowest cosine among its linked pairs; `leak` says it spans
    more than one split (train/val/test folders or the metadata's split column).
    """
    rows = np.flatnonzero(usable)  # skipped files (empty, not images) are no images: their bytes pair nothing
    exact = exact_pairs(manifest["sha256"].to_numpy(), np.flatnonzero(usable & manifest["sha256"].notna().to_numpy()))
    near = np.concatenate([similar_pairs(unit, rows, cos_threshold), range_pairs_hash(hashes, rows, hash_threshold)])
    pairs = np.unique(np.concatenate([exact, np.sort(near, axis=1)]), axis=0)
    if not len(pairs):
        return []
    labels = clusters(len(manifest), pairs)
    cos = np.einsum("ij,ij->i", unit[pairs[:, 0]], unit[pairs[:, 1]])
    ham = hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]])
    sha = manifest["sha256"].to_numpy()
    paths, splits = manifest["path"].to_numpy(), manifest["split"].to_numpy()
    edge_cluster = labels[pairs[:, 0]]
    out = []
    for c in np.unique(edge_cluster):
        members = np.flatnonzero(labels == c)
        on = edge_cluster == c
        same_bytes = len({sha[m] for m in members}) == 1
        both_usable = usable[pairs[on, 0]] & usable[pairs[on, 1]]
        split_set = sorted({str(s) for s in splits[members] if isinstance(s, str) and s})
        member_paths = sorted(str(p) for p in paths[members])
        out.append({
            "id": finding_id("near_duplicates", member_paths),
            "paths": member_paths,
            "score": round(float(cos[on][both_usable].min()), 4) if both_usable.any() else 1.0,
            "kind": "exact" if same_bytes else "near",
            "max_hash_distance": int(ham[on][both_usable].max()) if both_usable.any() else 0,
            "splits": split_set,
            "leak": len(split_set) > 1,
            "labels": sorted({str(v) for v in manifest["label"].to_numpy()[members] if isinstance(v, str)}),
        })
    out.sort(key=lambda f: (-f["score"], f["paths"]))
    return out


# ---- label issues -----------------------------------------------------------------------
def knn(unit: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows (cosine) of every row in `rows`, by engine/faiss_index's kNN
    graph (exact below its flat-index size): (indices [n, k], cosine similarities [n, k]);
    indices are dataset rows, -1 where fewer than k exist."""
    x = faiss_index.prepare(unit[rows], "cosine")
    k_eff = min(k, len(rows) - 1)
    if k_eff > 0:
        found, dist = faiss_index.knn_graph(faiss_index.build_index(x, "auto", "cosine"), x, k_eff, "cosine")
    else:
        found, dist = np.zeros((len(rows), 0), np.int64), np.zeros((len(rows), 0), np.float32)
    out = np.where(found >= 0, rows[np.maximum(found, 0)], -1)
    sims = np.where(found >= 0, _cosine(dist), 0.0)
    pad = k - out.shape[1]
    return np.pad(out, ((0, 0), (0, pad)), constant_values=-1), np.pad(sims, ((0, 0), (0, pad)))


def knn_label_probs(labels: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, n_labels: int) -> np.ndarray:
    """Out-of-sample P(label | image) from its neighbours' labels: similarity-weighted votes,
    each label's votes divided by its frequency (a large class does not win by size alone)."""
    w = np.where(neighbours >= 0, np.clip(sims, 0, None), 0.0)
    nl = np.where(neighbours >= 0, labels[np.maximum(neighbours, 0)], -1)
    w = np.where(nl >= 0, w, 0.0)
    votes = np.zeros((len(neighbours), n_labels))
    np.add.at(votes, (np.repeat(np.arange(len(nl)), nl.shape[1]), np.maximum(nl, 0).ravel()), w.ravel())
    votes /= np.maximum(np.bincount(labels[labels >= 0], minlength=n_labels), 1)[None, :]
    total = votes.sum(1, keepdims=True)
    return np.divide(votes, total, out=np.full_like(votes, 1.0 / max(n_labels, 1)), where=total > 0)


def model_label_probs(logits: np.ndarray, label_class: np.ndarray) -> np.ndarray:
    """The model's softmax restricted to the dataset's labels (each a model class index)."""
    z = logits[:, label_class].astype(np.float64)
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def label_margins(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Suggested label (the likeliest other label) and the normalized margin
    P(suggested) - P(given), the confident-learning ranking score: > 0 where the
    out-of-sample evidence prefers another label."""
    n = len(probs)
    others = probs.copy()
    others[np.arange(n), labels] = -np.inf
    suggested = others.argmax(1)
    return suggested, probs[np.arange(n), suggested] - probs[np.arange(n), labels]


def label_issue_findings(features: np.ndarray, logits: np.ndarray, manifest: pd.DataFrame, usable: np.ndarray,
                         model_class_of: dict[str, int], k: int = 5, min_class_size: int = 3,
                         min_margin: float = 0.1) -> tuple[list[dict], dict]:
    """Suspected label errors from out-of-sample evidence, ranked by margin.

    Evidence: kNN label votes in fc7 space (features centred on the dataset mean, cosine;
    only for images whose class has at least `min_class_size` images) and, when the labels
    are model classes (ImageNet WordNet ids), the model's softmax over the dataset's labels.
    The two are averaged; an image is suspect when another label is likelier than its own
    by at least `min_margin` (near-ties are not worth a look).
    """
    label_col = manifest["label"].to_numpy()
    rows = np.flatnonzero(usable & pd.notna(label_col))
    if not len(rows):
        return [], {"method": "none: no labelled images"}
    names, labels = np.unique(label_col[rows].astype(str), return_inverse=True)
    sizes = np.bincount(labels, minlength=len(names))
    terms = []
    if len(rows) > 1 and len(names) > 1:
        x = np.asarray(features, np.float32)
        unit = unit_rows(x - x[rows].mean(0))
        neighbours, sims = knn(unit, rows, k)
        pos = np.full(len(manifest), -1)
        pos[rows] = labels
        terms.append((knn_label_probs(pos, neighbours, sims, len(names)), sizes[labels] >= min_class_size))
    model_terms = len(names) > 1 and all(n in model_class_of for n in names)
    if model_terms:
        terms.append((model_label_probs(logits[rows], np.array([model_class_of[n] for n in names])),
                      np.ones(len(rows), bool)))
    weight = sum(w.astype(float)[:, None] for _, w in terms) if terms else np.zeros((len(rows), 1))
    evidence = weight[:, 0] > 0
    method = {"knn_k": k, "min_class_size": min_class_size, "model_confidence": model_terms,
              "images_with_evidence": int(evidence.sum()), "min_margin": min_margin,
              "rank": "normalized margin P(suggested) - P(given)"}
    if not evidence.any():
        return [], method
    probs = (sum(p * w.astype(float)[:, None] for p, w in terms) / np.maximum(weight, 1))[evidence]
    given = labels[evidence]
    suggested, score = label_margins(probs, given)
    paths = manifest["path"].to_numpy()
    out = [{"id": finding_id("label_issues", str(paths[r])), "path": str(paths[r]), "given": str(names[given[i]]),
            "suggested": str(names[suggested[i]]), "score": round(float(score[i]), 4),
            "given_prob": round(float(probs[i, given[i]]), 4)}
           for i, r in enumerate(rows[evidence]) if score[i] >= min_margin and score[i] > 0]
    out.sort(key=lambda f: (-f["score"], f["path"]))
    return out, method


# ---- outliers and representation --------------------------------------------------------
def centroid_similarity(unit: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row to the nearest class centroid, its own class's
    centroid taken without it (an image alone in its class is compared to the others)."""
    n_labels = labels.max() + 1
    sums = np.zeros((n_labels, unit.shape[1]), np.float64)
    np.add.at(sums, labels, unit)
    dots = unit @ sums.T
    norms = np.linalg.norm(sums, axis=1)
    sim = dots / np.maximum(norms, 1e-12)[None, :]
    own = dots[np.arange(len(unit)), labels]
    sq = np.einsum("ij,ij->i", unit, unit)
    own_norm = np.sqrt(np.maximum(norms[labels] ** 2 - 2 * own + sq, 0))
    sim[np.arange(len(unit)), labels] = np.where(own_norm > 1e-6, (own - sq) / np.maximum(own_norm, 1e-12), -np.inf)
    return sim.max(1)


def outlier_findings(unit: np.ndarray, manifest: pd.DataFrame, usable: np.ndarray, z: float = 4.0
                     ) -> tuple[list[dict], dict]:
    """Images far from every class centroid: robust z-score (median, MAD) of the nearest-
    centroid similarity below -z."""
    rows = np.flatnonzero(usable)
    if len(rows) < 3:
        return [], {}
    label_col = manifest["label"].to_numpy()[rows]
    _, labels = np.unique(np.where(pd.notna(label_col), label_col, "").astype(str), return_inverse=True)
    sim = centroid_similarity(unit[rows], labels)
    finite = np.isfinite(sim)
    med = float(np.median(sim[finite]))
    mad = float(1.4826 * np.median(np.abs(sim[finite] - med))) or 1e-6
    robust_z = np.where(finite, (sim - med) / mad, -np.inf)
    paths = manifest["path"].to_numpy()
    out = [{"id": finding_id("outliers", str(paths[r])), "path": str(paths[r]),
            "label": None if pd.isna(label_col[i]) else str(label_col[i]),
            "score": round(float(-robust_z[i]), 3) if np.isfinite(robust_z[i]) else None,
            "nearest_centroid_similarity": round(float(sim[i]), 4) if np.isfinite(sim[i]) else None}
           for i, r in enumerate(rows) if robust_z[i] < -z]
    out.sort(key=lambda f: (-(f["score"] or 1e9), f["path"]))
    return out, {"median_similarity": round(med, 4), "mad": round(mad, 4), "z": z,
                 "threshold_similarity": round(med - z * mad, 4)}


def counts_with_ratio(values: pd.Series) -> dict:
    counts = values.value_counts().sort_index()
    return {"counts": {str(k): int(v) for k, v in counts.items()},
            "ratio": round(float(counts.max() / counts.min()), 3) if len(counts) else None,
            "largest": str(counts.idxmax()) if len(counts) else None,
            "smallest": str(counts.idxmin()) if len(counts) else None}


def representation(manifest: pd.DataFrame, usable: np.ndarray, metadata: pd.DataFrame | None) -> dict:
    """Counts per class, per split and per metadata group column, with max/min ratios."""
    ok = manifest[usable]
    out = {"classes": counts_with_ratio(ok["label"].dropna().astype(str)),
           "splits": counts_with_ratio(ok["split"].dropna().astype(str)), "groups": {}}
    if metadata is not None:
        joined = ok[["path"]].merge(metadata, on="path", how="left")
        for col in group_columns(metadata):
            out["groups"][col] = {**counts_with_ratio(joined[col].dropna().astype(str)),
                                  "missing": int(joined[col].isna().sum())}
    return out


# ---- metadata -----------------------------------------------------------------------------
def read_metadata(path: str) -> pd.DataFrame:
    """The metadata CSV: a `path` column (relative to --data) plus group columns."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise InputError(f"metadata file not found: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"metadata file {path} is not a readable CSV: {str(e).splitlines()[0]}") from None
    if "path" not in df.columns:
        raise InputError(f"metadata file {path} has no `path` column (columns: {', '.join(map(str, df.columns))})")
    df["path"] = df["path"].str.replace("\\", "/", regex=False).str.replace(r"^(?:\./)+", "", regex=True)
    if df["path"].duplicated().any():  # after normalising: `./a.jpg` and `a.jpg` are one image
        raise InputError(f"metadata file {path} lists {df['path'].duplicated().sum()} paths more than once")
    return df


def group_columns(metadata: pd.DataFrame) -> list[str]:
    return [c for c in metadata.columns if c != "path"]


# ---- unit-level bias ----------------------------------------------------------------------
def top_k_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """[C, k] dataset rows with the highest score per unit, best first, ties to the lower row
    (the catalogue's top-K order) among `rows`."""
    s = np.asarray(scores[rows], dtype=np.float32)
    k = min(k, len(rows))
    order = np.argsort(-s, axis=0, kind="stable")[:k]
    return rows[order].T


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values)."""
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    if not n:
        return p
    order = np.argsort(p, kind="stable")
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(q, 1.0)
    return out


def group_enrichment(top_rows: np.ndarray, codes: np.ndarray, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit and group value: count in the unit's top-K and the top-K size with a known
    group (images without a value for this column are left out of the test)."""
    c = np.where(top_rows >= 0, codes[top_rows], -1)  # [C, K]; -1 rows: a catalogue's unfilled top-K slots
    known = (c >= 0).sum(1)
    counts = np.zeros((len(top_rows), n_values), np.int64)
    units = np.repeat(np.arange(len(top_rows)), c.shape[1])
    ok = c.ravel() >= 0
    np.add.at(counts, (units[ok], c.ravel()[ok]), 1)
    return counts, known


def unit_bias_findings(layer: str, top_rows: np.ndarray, metadata_codes: dict[str, tuple[np.ndarray, list[str]]],
                       usable: np.ndarray, paths: np.ndarray, alpha: float = 0.05, correction: str = "bh", min_count: int = 3
                       ) -> list[dict]:
    """Units whose top-K over-represent a metadata group relative to its base rate among
    usable images: one-sided hypergeometric test per (unit, column, value), corrected for
    the number of tests (Benjamini-Hochberg, or Bonferroni)."""
    out = []
    tests = []
    for col, (codes, values) in metadata_codes.items():
        codes = np.where(usable, codes, -1)
        population = int((codes >= 0).sum())
        if population == 0:
            continue
        base = np.bincount(codes[codes >= 0], minlength=len(values))
        counts, known = group_enrichment(top_rows, codes, len(values))
        p = hypergeom.sf(counts - 1, population, base[None, :], known[:, None])
        tests.append((col, values, counts, known, base, population, p))
    if not tests:
        return []
    flat = np.concatenate([t[-1].ravel() for t in tests])
    adjusted = bh_adjust(flat) if correction == "bh" else np.minimum(flat * len(flat), 1.0)
    offset = 0
    for col, values, counts, known, base, population, p in tests:
        q = adjusted[offset:offset + p.size].reshape(p.shape)
        offset += p.size
        for unit, v in zip(*np.nonzero((q < alpha) & (counts >= min_count))):
            rate = base[v] / population
            out.append({"id": finding_id("unit_bias", layer, int(unit), col, values[v]), "layer": layer,
                        "unit": int(unit), "column": col, "group": values[v], "count": int(counts[unit, v]),
                        "k": int(known[unit]), "base_rate": round(float(rate), 4),
                        "enrichment": round(float(counts[unit, v] / known[unit] / rate), 3),
                        "p_value": float(p[unit, v]), "q_value": float(q[unit, v]),
                        "top_paths": [str(paths[r]) for r in top_rows[unit] if r >= 0]})
    out.sort(key=lambda f: (f["q_value"], f["p_value"], f["layer"], f["unit"], f["column"], f["group"]))
    return out


def metadata_codes(manifest: pd.DataFrame, metadata: pd.DataFrame) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Integer code per manifest row for every group column (-1: no value)."""
    joined = manifest[["path"]].merge(metadata, on="path", how="left")
    out = {}
    for col in group_columns(metadata):
        values = sorted(joined[col].dropna().astype(str).unique())
        lookup = {v: i for i, v in enumerate(values)}
        out[col] = (joined[col].map(lambda v: lookup.get(str(v), -1) if pd.notna(v) else -1).to_numpy(np.int64),
                    values)
    return out


# ---- spurious context -------------------------------------------------------------------
def occlusion_probs(model, x: torch.Tensor, targets: torch.Tensor, cams: torch.Tensor, level: float = 0.5
                    ) -> dict[str, np.ndarray]:
    """p(target) on the full image, with only the Grad-CAM region (>= level) kept and with
    that region hidden (grey = the preprocessing mean), plus the region's area fraction."""
    from engine.inference import run_model

    mask = (cams >= level).to(x.dtype)[:, None]
    out = {}
    for name, xx in (("p_full", x), ("p_object", x * mask), ("p_context", x * (1 - mask))):
        logits, _ = run_model(model, xx)
        probs = logits.float().softmax(1)
        out[name] = probs.gather(1, targets[:, None])[:, 0].cpu().numpy()
        out[f"{name}_correct"] = (probs.argmax(1) == targets).float().cpu().numpy()
    out["area"] = mask.mean((1, 2, 3)).cpu().numpy()
    return out


def context_reliance_findings(manifest: pd.DataFrame, ctx: dict[str, np.ndarray], examples: int = 4) -> list[dict]:
    """Classes ranked by reliance on context: mean p(context only) / (mean p(context only) +
    mean p(object only)); 0.5 means surroundings and object alone score alike."""
    done = np.isfinite(ctx["p_full"])
    if not done.any():
        return []
    df = pd.DataFrame({k: v[done] for k, v in ctx.items()})
    df["path"] = manifest["path"].to_numpy()[done]
    df["label"] = manifest["label"].fillna("").astype(str).to_numpy()[done]
    df["image_reliance"] = df["p_context"] / np.maximum(df["p_context"] + df["p_object"], 1e-9)
    out = []
    for label, g in df.groupby("label", sort=True):
        pc, po = g["p_context"].mean(), g["p_object"].mean()
        ex = g.sort_values(["image_reliance", "path"], ascending=[False, True]).head(examples)
        out.append({"id": finding_id("context_reliance", label), "class": label, "images": int(len(g)),
                    "reliance": round(float(pc / max(pc + po, 1e-9)), 4),
                    "conf_full": round(float(g["p_full"].mean()), 4), "conf_object_only": round(float(po), 4),
                    "conf_context_only": round(float(pc), 4),
                    "acc_full": round(float(g["p_full_correct"].mean()), 4),
                    "acc_object_only": round(float(g["p_object_correct"].mean()), 4),
                    "acc_context_only": round(float(g["p_context_correct"].mean()), 4),
                    "object_area": round(float(g["area"].mean()), 4),
                    "examples": ex["path"].tolist()})
    out.sort(key=lambda f: (-f["reliance"], f["class"]))
    return out


# ---- drift ----------------------------------------------------------------------------------
def image_changes(previous: pd.DataFrame, current: pd.DataFrame) -> dict:
    """Added, removed, moved (same bytes, new path) and modified (same path, new bytes) images."""
    # a file that could not be read has no hash: it is never "moved", nor "modified" while it stays unread
    prev = {p: h if isinstance(h, str) else None for p, h in zip(previous["path"], previous["sha256"])}
    cur = {p: h if isinstance(h, str) else None for p, h in zip(current["path"], current["sha256"])}
    added = sorted(set(cur) - set(prev))
    removed = sorted(set(prev) - set(cur))
    removed_by_sha: dict[str, list[str]] = {}
    for p in removed:
        if prev[p] is not None:
            removed_by_sha.setdefault(prev[p], []).append(p)
    moved = []
    for p in added:
        olds = removed_by_sha.get(cur[p]) if cur[p] is not None else None
        if olds:
            moved.append({"from": olds.pop(0), "to": p})
    moved_from, moved_to = {m["from"] for m in moved}, {m["to"] for m in moved}
    return {"added": [p for p in added if p not in moved_to], "removed": [p for p in removed if p not in moved_from],
            "moved": moved, "modified": sorted(p for p in set(cur) & set(prev) if cur[p] != prev[p] and (cur[p] or prev[p]))}


RESCORED = "rescored"  # the cause of a new or resolved finding about images that did not change


def change_causes(images: dict) -> tuple[dict[str, str], dict[str, str]]:
    """From `image_changes`: what happened to each changed path, as the current audit names
    it (added, moved, modified) and as the previous one did (removed, moved, modified)."""
    now = {**{p: "added" for p in images["added"]}, **{m["to"]: "moved" for m in images["moved"]},
           **{p: "modified" for p in images["modified"]}}
    before = {**{p: "removed" for p in images["removed"]}, **{m["from"]: "moved" for m in images["moved"]},
              **{p: "modified" for p in images["modified"]}}
    return now, before


def finding_cause(finding: dict, changed: dict[str, str]) -> str:
    """Why a duplicate cluster, label suspect or outlier is new (or resolved): the change of
    its first changed image, or RESCORED when its images are the same bytes at the same
    paths and only the evidence about them moved (new neighbours, a recalibrated threshold)."""
    paths = finding.get("paths") or [finding["path"]]
    return next((changed[p] for p in paths if p in changed), RESCORED)


def finding_changes(previous: dict, current: dict) -> dict:
    """Per finding kind: ids that are new, resolved (gone) and persisting."""
    out = {}
    for kind in KINDS:
        prev = {f["id"] for f in previous.get(kind, [])}
        cur = {f["id"] for f in current.get(kind, [])}
        out[kind] = {"new": sorted(cur - prev), "resolved": sorted(prev - cur), "persisting": sorted(cur & prev)}
    return out


def class_centroids(unit: np.ndarray, labels: Sequence) -> dict[str, np.ndarray]:
    df = pd.DataFrame({"label": pd.Series(labels, dtype=object)}).dropna()
    return {str(lab): unit[g.index.to_numpy()].mean(0) for lab, g in df.groupby("label", sort=True)}


def centroid_shift(previous: dict[str, np.ndarray], current: dict[str, np.ndarray]) -> list[dict]:
    """Cosine distance between the fc7 centroids of each class present in both audits."""
    out = []
    for label in sorted(set(previous) & set(current)):
        a, b = previous[label], current[label]
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        out.append({"class": label, "shift": round(max(1 - cos, 0.0), 6)})  # no -0.0 from rounding
    out.sort(key=lambda f: (-f["shift"], f["class"]))
    return out


