"""The audit on a dataset built from the shared images: three visually distant superclasses
(dogs, birds, vehicles; WordNet ids), train/val folders, planted near-duplicates (resized,
recompressed, cropped, byte copies; some across splits), planted label errors (images
moved to a wrong superclass folder), and a second version of the dataset with planted
changes for drift. One feature computation per dataset, shared by every test here."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import false_discovery_control, hypergeom

from conftest import neurocat_cmd
from engine import audit
from flows.audit import AuditGateFailed, AuditSettings, apply_metadata_split, audit_flow, run_audit
from flows.common import RunOptions
from neurocat.cli import main
from storage.store import Store

SETTINGS = AuditSettings(calibration_images=10, context_per_class=2, top_k=8)
DOG = ("n02085620", "n02113978")
BIRD = [("n01514668", "n01622779"), ("n01795545", "n01860187"), ("n02002724", "n02058221")]
VEHICLE = ["n02690373", "n02814533", "n02835271", "n02930766", "n02951358", "n03673027", "n03770679",
           "n04310018", "n04461696", "n04509417"]
PER_CLASS = {"dog": 16, "bird": 16, "vehicle": 10}


def superclass(wnid: str) -> str | None:
    if DOG[0] <= wnid <= DOG[1]:
        return "dog"
    if any(a <= wnid <= b for a, b in BIRD):
        return "bird"
    return "vehicle" if wnid in VEHICLE else None


def pick(shared: Path) -> dict[str, list[Path]]:
    """Every shared image of each superclass, by WordNet id order."""
    out: dict[str, list[Path]] = {"dog": [], "bird": [], "vehicle": []}
    for folder in sorted(shared.iterdir()):
        sc = superclass(folder.name)
        if sc:
            out[sc] += sorted(folder.iterdir())
    return out


def jpeg(img: Image.Image, dest: Path, quality: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(dest, "JPEG", quality=quality)


def near_copy(src: Path, dest: Path, kind: str) -> None:
    img = Image.open(src).convert("RGB")
    w, h = img.size
    if kind == "resized":
        jpeg(img.resize((w // 2, h // 2), Image.BILINEAR), dest, 50)
    elif kind == "recompressed":
        jpeg(img, dest, 25)
    elif kind == "cropped":
        jpeg(img.crop((int(w * 0.06), int(h * 0.05), w, h)), dest, 90)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def place(src: Path, root: Path, split: str, label: str, name: str | None = None) -> str:
    rel = f"{split}/{label}/{name or src.name}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, root / rel)
    return rel


@pytest.fixture(scope="session")
def planted(shared_images, tmp_path_factory):
    """Version 1 of the dataset and what was planted in it."""
    root = tmp_path_factory.mktemp("audit") / "v1"
    pool = pick(shared_images)
    used = {sc: imgs[:PER_CLASS[sc]] for sc, imgs in pool.items()}
    rel: dict[Path, str] = {}
    moves = {("dog", 2): "bird", ("dog", 9): "vehicle", ("bird", 4): "vehicle", ("vehicle", 6): "dog"}
    label_errors = set()
    for sc, imgs in used.items():
        for i, src in enumerate(imgs):
            split = "val" if i >= len(imgs) - 2 else "train"
            folder = moves.get((sc, i), sc)
            rel[src] = place(src, root, split, folder)
            if folder != sc:
                label_errors.add(rel[src])
    dup_plan = [("dog", 3, "resized", "train"), ("dog", 4, "recompressed", "train"), ("bird", 2, "cropped", "train"),
                ("bird", 3, "resized", "val"), ("vehicle", 2, "recompressed", "val"), ("vehicle", 3, "cropped", "train"),
                ("dog", 5, "exact", "train")]
    dup_pairs = set()
    for sc, i, kind, split in dup_plan:
        src = used[sc][i]
        copy = f"{split}/{sc}/{kind}_copy_of_{src.stem}.jpg"
        near_copy(src, root / copy, kind)
        dup_pairs.add(tuple(sorted((rel[src], copy))))
    leaks = {p for p in dup_pairs if len({q.split("/")[0] for q in p}) > 1}
    spare = {sc: imgs[PER_CLASS[sc]:] for sc, imgs in pool.items()}
    return {"root": root, "label_errors": label_errors, "dup_pairs": dup_pairs, "leaks": leaks, "rel": rel,
            "used": used, "spare": spare}


@pytest.fixture(scope="session")
def first_audit(prefect_api, planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-run1")
    opts = RunOptions(data=str(planted["root"]), store=str(out / "a1.zarr"), report=str(out / "r1"), batch_size=16)
    result = audit_flow(opts, settings=SETTINGS)
    return {"opts": opts, "result": result, "findings": json.loads((out / "r1" / "findings.json").read_text())}


def pairs_of(clusters: list[dict]) -> set[tuple[str, str]]:
    return {(a, b) for c in clusters for i, a in enumerate(c["paths"]) for b in c["paths"][i + 1:]}


def test_findings_json_has_the_issue_format(first_audit):
    f = first_audit["findings"]
    for key in ("near_duplicates", "label_issues", "outliers", "imbalance", "context_reliance", "unit_bias", "drift"):
        assert key in f
    for d in f["near_duplicates"]:
        assert set(d) >= {"paths", "score", "id"} and d["paths"] == sorted(d["paths"])
    for li in f["label_issues"]:
        assert set(li) >= {"path", "given", "suggested", "score", "id"}
    assert f["imbalance"]["classes"]["counts"]  # per class counts
    assert (Path(first_audit["opts"].report) / "audit.html").exists()


def test_planted_near_duplicates_found_with_precision_and_recall(first_audit, planted):
    found = pairs_of(first_audit["findings"]["near_duplicates"])
    true = planted["dup_pairs"]
    hits = len(found & true)
    assert hits / len(true) >= 0.9, (true - found, found - true)
    assert hits / max(len(found), 1) >= 0.9, (found - true)
    exact = [d for d in first_audit["findings"]["near_duplicates"] if d["kind"] == "exact"]
    assert len(exact) == 1 and "exact_copy_of" in exact[0]["paths"][0]
    leaks = {tuple(d["paths"]) for d in first_audit["findings"]["leakage"]}
    assert leaks == planted["leaks"]


def test_similar_pairs_through_faiss_index_equal_brute_force(first_audit):
    """The kNN search with growing k (engine/faiss_index) finds every pair at or above the
    threshold, also where rows have many more such neighbours than the first k and where
    identical vectors tie with the row itself."""
    store = Store(first_audit["opts"].store, mode="r")
    unit = audit.unit_rows(store.read("features/fc7"))
    rows = np.flatnonzero(store.read_manifest()["status"].to_numpy() == "ok")
    copies = np.concatenate([unit, np.repeat(unit[rows[:1]], 5, axis=0)])  # six identical rows
    for vectors, chosen in ((unit, rows), (copies, np.concatenate([rows, np.arange(len(unit), len(copies))]))):
        sims = vectors[chosen] @ vectors[chosen].T
        a, b = np.triu_indices(len(chosen), 1)
        ordered = np.unique(sims[a, b])
        for quantile in (0.5, 0.99):
            m = int(quantile * len(ordered))
            while ordered[m] - ordered[m - 1] < 1e-4:  # a clear gap: no pair within rounding of the threshold
                m -= 1
            t = float(ordered[m - 1] + ordered[m]) / 2
            brute = {(int(chosen[i]), int(chosen[j])) for i, j in zip(a, b) if sims[i, j] >= t}
            found = audit.similar_pairs(vectors, chosen, t, k=2)
            assert {tuple(map(int, p)) for p in found} == brute and len(found) == len(brute)


def test_audit_publishes_a_markdown_summary_and_a_findings_table(prefect_api, first_audit, planted):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.report import _artifact_key

    key = _artifact_key(first_audit["opts"].store) + "-audit"
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key, key + "-findings"])))
    by_key = {a.key: a for a in found}
    findings = first_audit["findings"]
    assert by_key[key].type == "markdown"
    assert f"* near duplicates: {len(findings['near_duplicates'])}" in by_key[key].data
    assert f"* label issues: {len(findings['label_issues'])}" in by_key[key].data
    table = by_key[key + "-findings"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    listed = {r["what"] for r in rows if r["kind"] == "near_duplicates"}
    assert {" | ".join(p) for p in planted["dup_pairs"]} <= listed
    assert {r["what"].split(":")[0] for r in rows if r["kind"] == "label_issues"} >= planted["label_errors"]


def test_audit_summary_artifact_shows_hostile_names_as_text(prefect_api, tmp_path):
    """Class and store names are markdown-inert in the summary artifact: a folder named like a
    javascript: link or an HTML tag stays text in the Prefect UI."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.audit import GATES, publish_audit_artifacts
    from flows.report import _artifact_key

    link, tag = "[click me](javascript:alert(1)) **bold**", "<img src=x onerror=alert(2)>"
    findings = {k: [] for k in GATES} | {"drift": None,
                                         "imbalance": {"classes": {"ratio": 1.5, "largest": link, "smallest": tag}}}
    store = str(tmp_path / "[x](javascript:1).zarr")
    publish_audit_artifacts.fn(store, findings, {k: 0 for k in GATES}, str(tmp_path / "r" / "findings.json"))
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[_artifact_key(store) + "-audit"])))
    assert re.search(r"(?<!\\)[\[\]<>]", art.data) is None, art.data  # no link or tag: all escaped
    assert "\\*\\*bold\\*\\*" in art.data and "onerror" in art.data  # and still there as text
    assert str((tmp_path / "r" / "findings.json").resolve()) in art.data.replace("\\", "")  # absolute, escaped


def test_a_split_column_in_the_metadata_makes_duplicates_leak(first_audit, tmp_path):
    """Leakage from the metadata's split column, not only from train/ and val/ folders: a
    planted within-train pair becomes a leak when the metadata puts its copy in `test`."""
    opts = first_audit["opts"]
    store = Store(opts.store, mode="r")
    manifest = store.read_manifest()
    pair = next(d["paths"] for d in first_audit["findings"]["near_duplicates"] if not d["leak"])
    meta = audit.read_metadata(str(_write(tmp_path / "m.csv", pd.DataFrame({"path": [pair[1]], "split": ["test"]}))))
    relabelled = apply_metadata_split(manifest, meta)
    usable = manifest["status"].to_numpy() == "ok"
    unit = audit.unit_rows(store.read("features/fc7"))
    cal = store.attrs("audit")["methods"]["calibration"]
    dups = audit.duplicate_findings(unit, audit.dhash(store.read("thumbs")), relabelled, usable,
                                    cal["fc7_cosine"]["value"], int(-cal["dhash"]["value"]))
    leaks = [d for d in dups if d["leak"]]
    before = {tuple(d["paths"]) for d in first_audit["findings"]["leakage"]}
    assert {tuple(d["paths"]) for d in leaks} == before | {tuple(pair)}
    assert next(d for d in leaks if d["paths"] == pair)["splits"] == ["test", "train"]


def _write(path: Path, df: pd.DataFrame) -> Path:
    df.to_csv(path, index=False)
    return path


def test_context_reliance_is_ranked_from_the_stored_occlusions(first_audit):
    """Brute force from /audit/context: per class, mean p(context only) over mean p(context
    only) + mean p(object only), ranked; examples are occluded images of that class."""
    store = Store(first_audit["opts"].store, mode="r")
    manifest = store.read_manifest()
    p_obj, p_ctx = store.read("audit/context/p_object"), store.read("audit/context/p_context")
    done = np.isfinite(store.read("audit/context/p_full"))
    ranked = first_audit["findings"]["context_reliance"]
    assert [f["reliance"] for f in ranked] == sorted((f["reliance"] for f in ranked), reverse=True)
    assert {f["class"] for f in ranked} == {"dog", "bird", "vehicle"}
    for f in ranked:
        members = done & (manifest["label"].to_numpy() == f["class"])
        assert f["images"] == members.sum() == SETTINGS.context_per_class
        pc, po = p_ctx[members].mean(), p_obj[members].mean()
        assert f["reliance"] == pytest.approx(pc / (pc + po), abs=1e-4)
        assert set(f["examples"]) == set(manifest["path"][members])


def test_an_image_far_from_every_class_is_an_outlier(first_audit):
    """A planted feature vector opposite to every image is flagged; the real images are not."""
    store = Store(first_audit["opts"].store, mode="r")
    manifest = store.read_manifest()
    unit = audit.unit_rows(store.read("features/fc7"))
    usable = manifest["status"].to_numpy() == "ok"
    far = audit.unit_rows(-unit[usable].mean(0, keepdims=True))
    planted_manifest = pd.concat([manifest, pd.DataFrame({"path": ["train/dog/far.jpg"], "label": ["dog"]})],
                                 ignore_index=True)
    found, facts = audit.outlier_findings(np.concatenate([unit, far]), planted_manifest, np.append(usable, True))
    assert [f["path"] for f in found] == ["train/dog/far.jpg"], (found, facts)


def test_calibration_reports_threshold_fpr_and_recall(first_audit):
    store = Store(first_audit["opts"].store, mode="r")
    cal = store.attrs("audit")["methods"]["calibration"]
    cos = cal["fc7_cosine"]
    assert 0.3 < cos["value"] < 1.0
    assert cos["expected_false_pairs"] <= cal["max_false_pairs"]
    assert cal["recall_either"] >= 0.9  # augmented copies of real images are caught
    # the reported rate matches the calibration negatives where they are dense enough to count
    unit = audit.unit_rows(store.read("features/fc7"))
    usable = store.read_manifest()["status"].to_numpy() == "ok"
    sha = store.read_manifest()["sha256"].to_numpy()
    neg, _ = audit.negative_pairs(unit, audit.dhash(store.read("thumbs")), usable, sha)
    fpr, u, _ = audit.tail_fpr(neg)
    below = u - 0.05
    assert fpr(below) == pytest.approx((neg >= below).mean(), abs=1e-9)


def test_planted_label_errors_ranked_at_the_top(first_audit, planted):
    issues = first_audit["findings"]["label_issues"]
    ranked = [i["path"] for i in issues]
    errors = planted["label_errors"]
    assert errors <= set(ranked[:len(errors) + 2]), (ranked[:8], errors)
    for i in issues:
        if i["path"] in errors:
            true = next(sc for sc, imgs in planted["used"].items() for s in imgs if planted["rel"][s] == i["path"])
            assert i["suggested"] == true and i["given"] != true and i["score"] > 0
    # labels that are no ImageNet WordNet ids are shown as they are (ids get their class name)
    from reports.site import class_label
    page = (Path(first_audit["opts"].report) / "audit.html").read_text()
    assert f"given <b>{issues[0]['given']}</b> → suggested <b>{issues[0]['suggested']}</b>" in page
    assert class_label("n01440764") == "n01440764 · tench" and class_label("bird") == "bird"
    assert class_label(None) == "" and class_label(float("nan")) == ""


def test_rerun_gives_identical_findings_and_gate_fails_after_writing(first_audit):
    opts = first_audit["opts"]
    findings_path = Path(opts.report) / "findings.json"
    findings_path.unlink()
    with pytest.raises(AuditGateFailed) as err:
        audit_flow(opts, fail_on=["near_duplicates", "label_issues"], settings=SETTINGS)
    assert err.value.gates["near_duplicates"] == len(first_audit["findings"]["near_duplicates"])
    assert json.loads(findings_path.read_text()) == first_audit["findings"]
    state = audit_flow(opts, fail_on=["near_duplicates"], settings=SETTINGS, return_state=True)
    assert state.is_failed()


def test_unit_bias_detected_on_constructed_case_not_on_shuffled(first_audit, tmp_path):
    opts = first_audit["opts"]
    store = Store(opts.store, mode="r")
    manifest = store.read_manifest()
    usable = manifest["status"].to_numpy() == "ok"
    feats = store.read("features/fc7").astype(np.float32)
    unit = int(np.argmax(feats[usable].std(0)))
    top = audit.top_k_rows(feats, np.flatnonzero(usable), SETTINGS.top_k)[unit]
    rng = np.random.default_rng(0)
    group = np.array(["outdoor"] * len(manifest), dtype=object)
    extra = rng.choice(np.setdiff1d(np.flatnonzero(usable), top), 3, replace=False)
    group[np.concatenate([top, extra])] = "studio"
    meta = tmp_path / "meta.csv"
    pd.DataFrame({"path": manifest["path"], "camera": group}).to_csv(meta, index=False)
    result = run_audit(opts, Store(opts.store), metadata=str(meta), settings=SETTINGS)
    findings = json.loads(Path(result["findings"]).read_text())
    hits = [f for f in findings["unit_bias"] if f["unit"] == unit and f["column"] == "camera"]
    assert hits and hits[0]["group"] == "studio" and hits[0]["count"] == SETTINGS.top_k and hits[0]["q_value"] < 0.05
    assert findings["imbalance"]["groups"]["camera"]["counts"]["studio"] == SETTINGS.top_k + 3
    codes = audit.metadata_codes(manifest, pd.DataFrame({"path": manifest["path"], "camera": group}))
    top_all = audit.top_k_rows(feats, np.flatnonzero(usable), SETTINGS.top_k)
    for seed in range(3):
        perm = np.random.default_rng(seed + 1).permutation(len(manifest))
        shuffled = {"camera": (codes["camera"][0][perm], codes["camera"][1])}
        assert audit.unit_bias_findings("fc7", top_all, shuffled, usable, manifest["path"].to_numpy()) == []


def test_hypergeometric_p_value_matches_brute_force():
    population, group, k = 40, 12, 8
    for x in range(0, k + 1):
        brute = sum(math.comb(group, i) * math.comb(population - group, k - i) for i in range(x, k + 1)) \
            / math.comb(population, k)
        assert hypergeom.sf(x - 1, population, group, k) == pytest.approx(brute, rel=1e-9)
    p = np.random.default_rng(0).uniform(0, 0.2, 50) ** 2
    assert np.allclose(audit.bh_adjust(p), false_discovery_control(p, method="bh"))


def class_centroid_shift(store_a: Store, store_b: Store) -> dict[str, float]:
    """Brute force: 1 - cosine between the mean unit fc7 vector of each class in two stores."""
    def centroids(store):
        m = store.read_manifest()
        unit = audit.unit_rows(store.read("features/fc7"))
        ok = m["status"].to_numpy() == "ok"
        return {lab: unit[ok & (m["label"].to_numpy() == lab)].mean(0) for lab in set(m["label"][ok])}
    a, b = centroids(store_a), centroids(store_b)
    return {lab: 1 - float(a[lab] @ b[lab] / np.linalg.norm(a[lab]) / np.linalg.norm(b[lab])) for lab in a}


def test_second_audit_reports_exactly_the_planted_changes(first_audit, planted, tmp_path):
    """Version 2: two dogs added, a resized copy of a bird added (a new duplicate pair), a
    bird moved into the dog folder (a new label suspect), a dog and a planted label error
    (the minivan in the dog folder) removed (a resolved suspect); the vehicles untouched."""
    v2 = tmp_path / "v2"
    shutil.copytree(planted["root"], v2)
    rel, used = planted["rel"], planted["used"]
    removed = sorted([rel[used["dog"][7]], rel[used["vehicle"][6]]])
    assert rel[used["vehicle"][6]] in planted["label_errors"]
    for path in removed:
        (v2 / path).unlink()
    added = [place(planted["spare"]["dog"][0], v2, "train", "dog"), place(planted["spare"]["dog"][1], v2, "val", "dog")]
    bird = used["bird"][6]
    dup = f"train/bird/resized_copy_of_{bird.stem}.jpg"
    near_copy(bird, v2 / dup, "resized")
    moved_src = used["bird"][5]
    moved_to = f"train/dog/{moved_src.name}"
    shutil.move(v2 / rel[moved_src], v2 / moved_to)
    opts = RunOptions(data=str(v2), store=str(tmp_path / "a2.zarr"), report=str(tmp_path / "r2"), batch_size=16)
    result = audit_flow(opts, previous=first_audit["opts"].store, settings=SETTINGS)
    current = json.loads(Path(result["findings"]).read_text())
    d = current["drift"]
    assert d["images"] == {"added": sorted(added + [dup]), "removed": removed,
                           "moved": [{"from": rel[moved_src], "to": moved_to}], "modified": []}
    # duplicates: exactly the planted pair is new, caused by an added image; nothing resolved
    assert [(c["paths"], c["cause"]) for c in d["new_near_duplicates"]] == [(sorted([rel[bird], dup]), "added")]
    assert d["resolved"]["near_duplicates"] == []
    # label suspects caused by changed images: exactly the moved bird (new) and the removed minivan (resolved)
    planted_new = [(i["path"], i["given"], i["suggested"], i["cause"]) for i in d["new_label_issues"]
                   if i["cause"] != audit.RESCORED]
    assert planted_new == [(moved_to, "dog", "bird", "moved")]
    planted_resolved = [(i["path"], i["cause"]) for i in d["resolved"]["label_issues"] if i["cause"] != audit.RESCORED]
    assert planted_resolved == [(rel[used["vehicle"][6]], "removed")]
    # the rest of the change in suspects is unchanged images crossing the margin: recomputed from both lists
    before = {i["path"] for i in first_audit["findings"]["label_issues"]}
    now = {i["path"] for i in current["label_issues"]}
    changed_now, changed_before = set(added + [dup, moved_to]), set(removed + [rel[moved_src]])
    assert {i["path"] for i in d["new_label_issues"] if i["cause"] == audit.RESCORED} == (now - before) - changed_now
    assert {i["path"] for i in d["resolved"]["label_issues"] if i["cause"] == audit.RESCORED} == \
        (before - now) - changed_before
    assert d["findings"]["label_issues"]["new"] == len(now - before)
    assert d["findings"]["label_issues"]["resolved"] == len(before - now)
    # class centroids: the reported shift is the brute-force one; the untouched vehicles did not move
    expected = class_centroid_shift(Store(first_audit["opts"].store, mode="r"), Store(opts.store, mode="r"))
    shifts = {c["class"]: c["shift"] for c in d["centroid_shift"]}
    assert set(shifts) == {"dog", "bird", "vehicle"}
    for cls, shift in shifts.items():
        assert shift == pytest.approx(expected[cls], abs=1e-6)
    assert shifts["vehicle"] < 1e-5 < 1e-3 < min(shifts["dog"], shifts["bird"])
    html = (tmp_path / "r2" / "audit.html").read_text()
    assert "badge-new" in html and "badge-persisting" in html and "(removed)" in html
    assert all(f'alt="{p}"' in html for p in added)  # added images shown as thumbnails


def test_bad_metadata_is_one_line_exit_2(shared_images, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,group\na.jpg,x\n")
    code = main(["audit", "--data", str(shared_images), "--metadata", str(bad), "--report", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "no `path` column" in err and "Traceback" not in err
    assert main(["audit", "--data", str(shared_images), "--fail-on", "typos"]) == 2


def test_a_bad_previous_store_is_refused_before_the_flow(first_audit, demo_data, tmp_path):
    """`--previous` naming no store, or a store without an audit, was found out inside the
    flow, so Prefect printed the flow's traceback before the one-line error: now it is
    checked before the flow starts. So is an audit made with other weights (it was taken:
    the drift's class-centroid comparison failed on the shapes after the whole audit, or
    compared unrelated features); its weights hash stands for another model's here."""
    import shutil

    Store(str(tmp_path / "no_audit.zarr"))
    other = tmp_path / "other_weights.zarr"
    shutil.copytree(first_audit["result"]["store"], other)
    Store(str(other)).update_attrs("features/fc7", weights="tuned.pth", weights_sha256="0" * 64)
    cases = {str(tmp_path / "missing.zarr"): f"no neurocat store at {tmp_path / 'missing.zarr'}",
             str(tmp_path / "no_audit.zarr"): f"store {tmp_path / 'no_audit.zarr'} holds no audit",
             str(other): f"store {other} was audited with efficientnet_lite0 (weights tuned.pth), this audit uses "
                         "efficientnet_lite0 (weights efficientnet-lite0-57934424.pth): drift compares the features "
                         "of one model"}
    for previous, reason in cases.items():
        out = subprocess.run(neurocat_cmd() + ["audit", "--data", str(demo_data), "--store", str(tmp_path / "a.zarr"),
                                               "--limit", "4", "--previous", previous],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.stderr == f"neurocat: error: --previous: {reason}\n"
    assert not (tmp_path / "a.zarr").exists()


def test_dhash_is_robust_to_rescale_and_not_to_other_images(shared_images):
    paths = sorted(shared_images.glob("*/*"))[:6]
    thumbs, copies = [], []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((64, 64))
        thumbs.append(np.asarray(img))
        buf = io.BytesIO()
        img.resize((40, 40)).resize((64, 64)).save(buf, "JPEG", quality=40)
        copies.append(np.asarray(Image.open(buf).convert("RGB")))
    a, b = audit.dhash(np.stack(thumbs)), audit.dhash(np.stack(copies))
    same = audit.hamming(a, b)
    other = audit.hamming(a, np.roll(b, 1, axis=0))
    assert same.max() <= 8 < other.min()


def test_calibration_without_distinct_pairs_flags_nothing_false():
    """One usable image, or only copies of one picture (every pair within SAME_HASH bits): no
    distinct pair exists to calibrate on, so the expected false pairs are 0, not a crash."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=16).astype(np.float32)
    for feats in (base[None], np.stack([base, base + 0.01, base - 0.01])):
        n = len(feats)
        unit = audit.unit_rows(feats)
        hashes = np.repeat(rng.integers(0, 256, (1, 8), dtype=np.uint8), n, axis=0)
        neg_cos, neg_hash = audit.negative_pairs(unit, hashes, np.ones(n, bool), [f"sha{i}" for i in range(n)])
        cal = audit.calibrate(np.array([0.95]), np.array([-2.0]), np.array(["jpeg"]), neg_cos, neg_hash, n)
        assert cal["fc7_cosine"]["expected_false_pairs"] == 0 and cal["dhash"]["expected_false_pairs"] == 0


def test_skipped_files_with_equal_bytes_are_no_duplicates():
    """Two empty files (skipped: not images) in train/ and val/ share their bytes but are no
    images: no duplicate cluster, no leak; two usable byte-identical images still are one."""
    import hashlib

    empty = hashlib.sha256(b"").hexdigest()
    manifest = pd.DataFrame({"path": ["train/dog/a.jpg", "train/dog/broken.jpg", "val/dog/b.jpg",
                                      "val/dog/broken.jpg", "val/dog/a_copy.jpg"],
                             "label": ["dog"] * 5, "split": ["train", "train", "val", "val", "val"],
                             "sha256": ["h1", empty, "h2", empty, "h1"],
                             "status": ["ok", "skipped", "ok", "skipped", "ok"]})
    usable = manifest["status"].to_numpy() == "ok"
    rng = np.random.default_rng(0)
    unit = audit.unit_rows(rng.normal(size=(5, 32)).astype(np.float32))
    unit[4] = unit[0]
    hashes = rng.integers(0, 256, (5, 8), dtype=np.uint8)
    hashes[4] = hashes[0]
    found = audit.duplicate_findings(unit, hashes, manifest, usable, 0.99, 2)
    assert [(f["paths"], f["kind"], f["leak"]) for f in found] == [(["train/dog/a.jpg", "val/dog/a_copy.jpg"],
                                                                    "exact", True)]


def test_metadata_paths_are_compared_after_normalising(tmp_path):
    """`./a.jpg` and `a.jpg` name one image (a one-line error, not a crash later); a leading
    dot of a file name is the name's, not a `./` prefix."""
    from engine.errors import InputError

    dup = _write(tmp_path / "dup.csv", pd.DataFrame({"path": ["train/dog/a.jpg", "./train/dog/a.jpg"], "g": ["x", "y"]}))
    with pytest.raises(InputError, match="more than once"):
        audit.read_metadata(str(dup))
    odd = _write(tmp_path / "odd.csv", pd.DataFrame({"path": ["./.hidden.jpg", "..dots.jpg", "sub\\win.jpg"], "g": ["x"] * 3}))
    assert audit.read_metadata(str(odd))["path"].tolist() == [".hidden.jpg", "..dots.jpg", "sub/win.jpg"]


def test_drift_never_matches_files_that_could_not_be_read(tmp_path):
    """Files without a content hash (unreadable) are not "moved" onto each other, and one that
    stays unreadable is not "modified"; one that became unreadable is."""
    prev = pd.DataFrame({"path": ["a.jpg", "old_unreadable.jpg", "same_unreadable.jpg", "broke.jpg"],
                         "sha256": ["h1", None, None, "h2"]})
    cur = pd.DataFrame({"path": ["a.jpg", "new_unreadable.jpg", "same_unreadable.jpg", "broke.jpg"],
                        "sha256": ["h1", None, None, None]})
    prev.to_parquet(tmp_path / "p.parquet")
    cur.to_parquet(tmp_path / "c.parquet")  # as the store gives manifests back: None becomes NaN
    changes = audit.image_changes(pd.read_parquet(tmp_path / "p.parquet"), pd.read_parquet(tmp_path / "c.parquet"))
    assert changes == {"added": ["new_unreadable.jpg"], "removed": ["old_unreadable.jpg"], "moved": [],
                       "modified": ["broke.jpg"]}


def test_context_check_follows_a_new_selection_in_the_same_store(prefect_api, shared_images, tmp_path):
    """A rerun on the same store with more images per class occludes the newly chosen ones
    (the selection is part of each shard's inputs)."""
    for folder, wnids in (("classA", ["n01440764", "n01494475", "n01514859"]),
                          ("classB", ["n01532829", "n01560419", "n01601694"])):
        for w in wnids:
            place(next((shared_images / w).iterdir()), tmp_path / "data", "train", folder)
    opts = RunOptions(data=str(tmp_path / "data"), store=str(tmp_path / "s.zarr"), report=str(tmp_path / "r"),
                      batch_size=8)
    for per_class in (1, 3):
        audit_flow(opts, settings=AuditSettings(calibration_images=2, context_per_class=per_class, top_k=2))
        found = json.loads((tmp_path / "r" / "findings.json").read_text())["context_reliance"]
        assert sorted(f["images"] for f in found) == [per_class, per_class]
        assert int(np.isfinite(Store(opts.store).read("audit/context/p_full")).sum()) == 2 * per_class


def test_unfilled_catalogue_slots_count_for_no_group():
    """A catalogue that saw fewer images than its top-K pads with -1: those slots are no image
    (they used to count as the last row: known > population, NaN p-values)."""
    codes = np.array([0, 0, 0, 1, 1, 1])
    top = np.array([[0, 1, 3, 4, 2, 5, -1, -1], [3, 4, 5, 0, 1, -1, -1, -1]])
    counts, known = audit.group_enrichment(top, codes, 2)
    assert counts.tolist() == [[3, 3], [2, 3]] and known.tolist() == [6, 5]
    paths = np.array([f"{i}.jpg" for i in range(6)])
    found = audit.unit_bias_findings("L", top, {"g": (codes, ["a", "b"])}, np.ones(6, bool), paths, min_count=1,
                                     alpha=1.01)
    assert found and all(np.isfinite(f["p_value"]) and np.isfinite(f["q_value"]) for f in found)
    assert all(len(f["top_paths"]) == f["k"] for f in found)  # the real rows only


def test_kinds_the_audits_did_not_look_for_alike_are_not_compared(first_audit, model):
    """An audit run without the context test (--context-per-class 0) after one with it called
    every earlier context finding "resolved" (a sweep of the CLI found it): those images were
    not tested, not cleared. Such kinds are left out of the drift, with the reason."""
    import copy

    from flows.audit import drift, not_compared, previous_state

    store = Store(first_audit["result"]["store"], mode="r")
    prev = previous_state(first_audit["result"]["store"], model)
    assert prev["findings"]["context_reliance"]  # the first audit has some
    manifest = store.read_manifest()
    usable = manifest["status"].to_numpy() == "ok"
    unit = audit.unit_rows(store.read("features/fc7"))
    now = copy.deepcopy(prev["findings"])
    now["context_reliance"] = []  # what a run with the context test off finds
    then = AuditSettings(**prev["settings"])  # what the store's last audit used (other tests rerun it)
    skipped = not_compared(prev, then.model_copy(update={"context_per_class": 0}), prev["metadata"])
    assert skipped == {"context_reliance": f"context images per class {then.context_per_class} then, 0 now"}
    d = drift(prev, manifest, unit, usable, now, skipped)
    assert "context_reliance" not in d["findings"] and "context_reliance" not in d["resolved"]
    assert d["not_compared"] == skipped and d["findings"]["near_duplicates"]["resolved"] == 0
    assert not_compared(prev, then, prev["metadata"]) == {}  # the same settings: everything compared
