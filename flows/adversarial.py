"""`neurocat render adversarial`: attack every image at every eps, measure robustness, report.

Store layout (one group per attack configuration, `<group>` = `<attack>-<norm>` plus
`-target<class>` when targeted, e.g. `pgd-linf`, `fgsm-linf-target954`):

  /adversarial/<group>/label                 int32 [N]   true class index, -1 if unknown
  /adversarial/<group>/clean/images          uint8 [N, 224, 224, 3]  the clean crops
  /adversarial/<group>/clean/{pred,conf,transfer_pred}
  /adversarial/<group>/<eps>/images          uint8 [N, 224, 224, 3]  adversarial images
  /adversarial/<group>/<eps>/perturbation    uint8 [N, 224, 224, 3]  128 + gain * (adv - clean)
  /adversarial/<group>/<eps>/{pred,conf,transfer_pred,linf,l2}       per image

`<eps>` is `4_255` for L-inf eps 4/255, `0p5` for L2 eps 0.5. Image arrays are chunked one
image per chunk, per-image numbers by shard. The group's attrs hold the model provenance,
every attack parameter per eps, the seed, the transfer model and the `summary` per eps
(accuracy, success rate, mean norms, confidences, transfer accuracy) that the robustness
report (reports/sections/adversarial.py) shows. Rows of undecodable files stay zero / -1.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from prefect import flow

from engine.attacks import (ATTACKS, AttackSpec, amplification, eps_key, eps_label, parse_class,
                            parse_eps_list)
from engine.classes import imagenet_classes
from engine.errors import InputError
from engine.files import dataset_file
from engine.images import label_index
from engine.models import cached_model
from flows.common import (RunOptions, map_shards, model_provenance, plan_shards, record_failures, record_job,
                          resolve_paths, scan_dataset, shard_fingerprint, shard_items, stage)
from flows.report import publish_report
from flows.runners import threads_runner
from storage.store import Store, fingerprint
from tasks.adversarial import attack_shard, fit_universal


def group_name(spec: AttackSpec) -> str:
    return f"{spec.attack}-{spec.norm}" + (f"-target{spec.targeted}" if spec.targeted is not None else "")


def attack_spec(attack: str, norm: str = "linf", steps: int | None = None, step_size: float | str | None = None,
                random_start: bool = True, targeted: int | str | None = None) -> AttackSpec:
    """Validated attack options (bad values are InputErrors, exit 2 on the command line)."""
    if attack not in ATTACKS:
        raise InputError(f"unknown attack {attack!r}; use one of {', '.join(ATTACKS)}")
    if norm not in ("linf", "l2"):
        raise InputError(f"unknown norm {norm!r}; use linf or l2")
    if steps is not None and steps < 1:
        raise InputError("--steps must be at least 1")
    if attack == "universal" and targeted is not None:
        raise InputError("the universal perturbation is untargeted; drop --targeted")
    size = parse_eps_list([step_size])[0] if step_size is not None else None
    target = parse_class(targeted, imagenet_classes()) if targeted is not None else None
    return AttackSpec(attack, norm, steps, size, random_start, target)


def summarize(store: Store, group: str, keys: list[str], labels: np.ndarray, ok: np.ndarray,
              target: int | None, transfer: bool) -> dict:
    """Accuracy, success rate, norms and confidences of the clean images and of each eps."""
    root = f"adversarial/{group}"
    clean = store.read(f"{root}/clean/pred")
    known = ok & (labels >= 0)
    reference = np.where(labels >= 0, labels, clean)  # what an untargeted attack moves away from

    def accuracy(pred) -> float | None:
        return float((pred[known] == labels[known]).mean()) if known.any() else None

    def success(pred) -> float | None:
        if target is not None:
            eligible = ok & (reference != target)
            return float((pred[eligible] == target).mean()) if eligible.any() else None
        eligible = ok & (clean == reference)  # images the model got right to begin with
        return float((pred[eligible] != reference[eligible]).mean()) if eligible.any() else None

    out = {"images": int(ok.sum()), "labelled": int(known.sum()), "clean_accuracy": accuracy(clean),
           "clean_confidence": float(store.read(f"{root}/clean/conf")[ok].mean()) if ok.any() else None,
           "clean_transfer_accuracy": accuracy(store.read(f"{root}/clean/transfer_pred")) if transfer else None,
           "per_eps": []}
    for key in keys:
        pred = store.read(f"{root}/{key}/pred")
        row = {"key": key, "accuracy": accuracy(pred), "success_rate": success(pred)}
        for name in ("conf", "linf", "l2"):
            row[f"mean_{name}"] = float(store.read(f"{root}/{key}/{name}")[ok].mean()) if ok.any() else None
        row["transfer_accuracy"] = accuracy(store.read(f"{root}/{key}/transfer_pred")) if transfer else None
        out["per_eps"].append(row)
    return out


def fit_universal_once(opts: RunOptions, store: Store, job: str, group: str, manifest, spec: AttackSpec,
                       eps: list[float], keys: list[str], prov: dict, params: list[dict], images: int) -> dict:
    """Fit (or find already fitted) the universal perturbations; returns the fit's facts."""
    if images < 1:
        raise InputError("--universal-images must be at least 1")
    ok = manifest[manifest["status"] == "ok"].head(images)
    items = [(int(i), dataset_file(opts.data, p)) for i, p in zip(ok.index, ok["path"])]
    fp = fingerprint(job, list(zip(ok["path"], ok["sha256"])), prov, params, opts.batch_size)
    with stage(store, job, "fit"):
        done = store.shard_done(job, "universal", fp)
        if done is None:
            done = fit_universal(opts.store, job, group, items, opts.model, opts.weights, opts.device,
                                 opts.batch_size, asdict(spec), eps, keys, fp)
    return {**done, "fingerprint": fp}


def run_adversarial(opts: RunOptions, store: Store, attack: str = "fgsm",
                    eps_list: list[str | float] | str = ("1/255", "2/255", "4/255", "8/255"),
                    targeted: int | str | None = None, norm: str = "linf", steps: int | None = None,
                    step_size: float | str | None = None, random_start: bool = True, seed: int = 0,
                    transfer_model: str | None = None, transfer_weights: str | None = None,
                    universal_images: int = 64) -> dict:
    """Scan, attack every shard at every eps, summarise into the group's attrs. Used by demo too.

    `universal` first fits one perturbation per eps on the first `universal_images` usable
    images (one task; `steps` = sweeps), then every shard applies it."""
    spec = attack_spec(attack, norm, steps, step_size, random_start, targeted)
    eps = parse_eps_list(eps_list, norm)
    if transfer_weights and not transfer_model:
        raise InputError("--transfer-weights needs --transfer-model NAME")
    transfer = (transfer_model, transfer_weights) if transfer_model else None
    transfer_prov = cached_model(transfer_model, transfer_weights, opts.device).describe() if transfer else None
    group = group_name(spec)
    job = f"adversarial-{group}"
    keys = [eps_key(e, norm) for e in eps]
    gains = [amplification(e, norm) for e in eps]
    with stage(store, job, "scan"):
        scan_dataset(opts.store, opts.data, opts.limit, opts.report)
    manifest = store.read_manifest()
    n = len(manifest)
    classes = imagenet_classes()
    labels = np.array([label_index(lab, classes.index_of) for lab in manifest["label"]], dtype=np.int32)
    shards = plan_shards(n, opts.shard_size)
    prov = model_provenance(opts)
    crop = cached_model(opts.model, opts.weights, opts.device).preprocessing.crop
    params = [spec.resolved(e) for e in eps]
    root = f"adversarial/{group}"
    store.write_array(f"{root}/label", labels, attrs={"what": "true class index, -1 if unknown"})
    for key, p, gain in [("clean", None, None), *zip(keys, params, gains)]:
        names = [("images", "uint8"), ("pred", "int32"), ("conf", "float32"), ("transfer_pred", "int32")]
        if p is not None:
            names += [("perturbation", "uint8"), ("linf", "float32"), ("l2", "float32")]
        for name, dtype in names:
            image = name in ("images", "perturbation")
            store.create_array(f"{root}/{key}/{name}", (n, crop, crop, 3) if image else (n,), dtype,
                               chunks=(1, crop, crop, 3) if image else (opts.shard_size,),
                               attrs={**prov, **(p or {}), **({"gain": gain, "display": "128 + gain * (adv - clean)"}
                                                               if name == "perturbation" else {})})
    fitted = fit_universal_once(opts, store, job, group, manifest, spec, eps, keys, prov, params,
                                universal_images) if spec.attack == "universal" else None
    fps = [shard_fingerprint(job, manifest, s, prov, params, seed, opts.batch_size, transfer_prov, fitted)
           for s in shards]
    with stage(store, job, "attack"):
        results = map_shards(attack_shard, store, job, shards, fps, lambda s: dict(
            store_path=opts.store, job=job, group=group, shard=s.id, start=s.start, stop=s.stop,
            items=shard_items(manifest, opts.data, s), labels=labels[s.start:s.stop].tolist(), model=opts.model,
            weights=opts.weights, device=opts.device, batch_size=opts.batch_size, spec=asdict(spec), eps_list=eps,
            keys=keys, gains=gains, seed=seed, transfer=transfer), opts.progress)
    manifest = record_failures(store, results)
    ok = manifest["status"].values == "ok"
    summary = summarize(store, group, keys, labels, ok, spec.targeted, transfer is not None)
    for row, e in zip(summary["per_eps"], eps):
        row.update(eps=e, label=eps_label(e, norm))
    store.update_attrs(root, **prov, attack=spec.attack, universal=fitted, norm=norm, targeted=spec.targeted,
                       target_name=classes.names[spec.targeted] if spec.targeted is not None else None,
                       params=params, seed=seed, keys=keys, transfer=transfer_prov, summary=summary)
    record_job(store, job, opts, attack=spec.attack, norm=norm, eps=[eps_label(e, norm) for e in eps],
               targeted=spec.targeted, seed=seed, transfer_model=transfer_model,
               accuracy=[r["accuracy"] for r in summary["per_eps"]])
    return {"group": group, **summary}


@flow(name="adversarial", log_prints=True, task_runner=threads_runner())
def adversarial_flow(opts: RunOptions, attack: str = "fgsm",
                     eps_list: list[str | float] | str = ("1/255", "2/255", "4/255", "8/255"),
                     targeted: int | str | None = None, norm: str = "linf", steps: int | None = None,
                     step_size: float | str | None = None, random_start: bool = True, seed: int = 0,
                     transfer_model: str | None = None, transfer_weights: str | None = None,
                     universal_images: int = 64) -> dict:
    opts = resolve_paths(opts, "adversarial")
    store = Store(opts.store)
    with store.lock():
        summary = run_adversarial(opts, store, attack, eps_list, targeted, norm, steps, step_size, random_start,
                                  seed, transfer_model, transfer_weights, universal_images)
        report = publish_report(opts.store, opts.report)
    return {"store": opts.store, "report": str(report), **summary}
