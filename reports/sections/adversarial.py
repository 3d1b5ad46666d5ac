"""Robustness report: for every attack run in `/adversarial/<group>` (flows/adversarial.py),
accuracy against eps (one curve per attack, dashed for the transfer model), success rate,
mean perturbation norms, confidence histograms and example triptychs
(clean | amplified perturbation | adversarial, with labels and predictions)."""

from __future__ import annotations

import numpy as np

from engine.classes import imagenet_classes
from reports.site import Section, SectionSkipped, Site

EXAMPLES = 8  # triptychs per eps


def finished_groups(store) -> list[str]:
    """Attack groups whose flow wrote its summary (a run killed before the end has none)."""
    if not store.has("adversarial"):
        return []
    return [g for g in store.groups("adversarial") if "summary" in store.attrs(f"adversarial/{g}")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_figure(runs: list[dict]):
    """Top-1 accuracy against eps, one line per attack (transfer model dashed), eps 0 = clean;
    one panel per norm (L-inf eps in grey levels /255, L2 eps in [0, 1] pixel units)."""
    plt = _pyplot()
    norms = sorted({run["norm"] for run in runs}, key=["linf", "l2"].index)
    fig, axes = plt.subplots(1, len(norms), figsize=(6.4 * len(norms), 3.4), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        scale = 255 if norm == "linf" else 1
        for run in (r for r in runs if r["norm"] == norm):
            s = run["summary"]
            if s["clean_accuracy"] is None:
                continue
            xs = [0.0] + [r["eps"] * scale for r in s["per_eps"]]
            line, = ax.plot(xs, [s["clean_accuracy"]] + [r["accuracy"] for r in s["per_eps"]], "o-",
                            label=run["title"])
            if s["clean_transfer_accuracy"] is not None:
                ax.plot(xs, [s["clean_transfer_accuracy"]] + [r["transfer_accuracy"] for r in s["per_eps"]], "s--",
                        color=line.get_color(), alpha=0.7, label=f"{run['title']} → {run['transfer_name']}")
        ax.set_xlabel("eps (L∞, grey levels /255)" if norm == "linf" else "eps (L2, [0, 1] pixel units)")
        ax.set_ylabel("top-1 accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def confidence_figure(store, group: str, summary: dict, ok: np.ndarray):
    """Histograms of the top-1 probability on clean images and at each eps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    bins = np.linspace(0, 1, 26)
    series = [("clean", "clean")] + [(r["key"], f"eps {r['label']}") for r in summary["per_eps"]]
    for key, name in series:
        conf = store.read(f"adversarial/{group}/{key}/conf")[ok]
        ax.hist(conf, bins=bins, histtype="step", linewidth=1.6, label=name)
    ax.set_xlabel("top-1 probability")
    ax.set_ylabel("images")
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def pick_examples(pred: np.ndarray, reference: np.ndarray, ok: np.ndarray, target: int | None) -> np.ndarray:
    """The first images where the attack worked, topped up with others when there are few."""
    worked = (pred == target) if target is not None else (pred != reference)
    order = np.concatenate([np.flatnonzero(ok & worked), np.flatnonzero(ok & ~worked)])
    return order[:EXAMPLES]


def triptychs(site: Site, group: str, key: str, index: np.ndarray, labels: np.ndarray, clean_pred: np.ndarray,
              clean_conf: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> list[dict]:
    names = imagenet_classes().names
    root = f"adversarial/{group}"
    clean = site.store.array(f"{root}/clean/images").oindex[index] if len(index) else []
    pert = site.store.array(f"{root}/{key}/perturbation").oindex[index] if len(index) else []
    adv = site.store.array(f"{root}/{key}/images").oindex[index] if len(index) else []
    paths = site.manifest["path"].values
    out = []
    for i, c, p, a in zip(index, clean, pert, adv):
        gap = np.full((c.shape[0], 6, 3), 255, np.uint8)
        rel = site.image(np.concatenate([c, gap, p, gap, a], axis=1), f"adversarial/{group}/{key}/{i}.png")
        out.append({"src": rel, "path": paths[i], "label": names[labels[i]] if labels[i] >= 0 else "–",
                    "clean": names[clean_pred[i]], "clean_conf": float(clean_conf[i]),
                    "adv": names[pred[i]], "adv_conf": float(conf[i]), "changed": bool(pred[i] != clean_pred[i])})
    return out


def run_page(site: Site, group: str) -> dict:
    """The page of one attack group; returns what the overview needs."""
    store = site.store
    root = f"adversarial/{group}"
    attrs = store.attrs(root)
    summary = attrs["summary"]
    names = imagenet_classes().names
    ok = site.manifest["status"].values == "ok"
    labels = store.read(f"{root}/label")
    clean_pred, clean_conf = store.read(f"{root}/clean/pred"), store.read(f"{root}/clean/conf")
    reference = np.where(labels >= 0, labels, clean_pred)
    target = attrs.get("targeted")
    transfer = attrs.get("transfer")
    title = f"{attrs['attack'].upper()} ({attrs['norm']})" + (f" → {names[target]}" if target is not None else "")
    examples = []
    for row, params in zip(summary["per_eps"], attrs["params"]):
        pred, conf = store.read(f"{root}/{row['key']}/pred"), store.read(f"{root}/{row['key']}/conf")
        index = pick_examples(pred, reference, ok, target)
        gain = store.attrs(f"{root}/{row['key']}/perturbation")["gain"]
        examples.append({"label": row["label"], "params": params, "gain": round(gain, 1),
                         "triptychs": triptychs(site, group, row["key"], index, labels, clean_pred, clean_conf, pred, conf)})
    hist = site.figure(confidence_figure(store, group, summary, ok), f"adversarial/{group}/confidence.png")
    run = {"group": group, "title": title, "norm": attrs["norm"], "summary": summary, "href": f"adversarial/{group}.html",
           "transfer_name": transfer["model"] if transfer else None}
    curve = site.figure(accuracy_figure([run]), f"adversarial/{group}/accuracy.png")
    site.render("adversarial_run.html", run["href"], title=f"Robustness: {title}", run=run, attrs=attrs,
                curve=curve, hist=hist, examples=examples, target_name=names[target] if target is not None else None)
    return run


def build(site: Site) -> Section | None:
    groups = finished_groups(site.store)
    if not groups:
        if site.store.has("adversarial"):
            raise SectionSkipped("adversarial runs were started but none finished; rerun to resume")
        return None
    runs = [run_page(site, g) for g in groups]
    curve = site.figure(accuracy_figure(runs), "adversarial/accuracy.png")
    site.render("adversarial.html", "adversarial.html", title="Robustness", runs=runs, curve=curve)
    worst = min((r["accuracy"], r["label"], run["title"]) for run in runs for r in run["summary"]["per_eps"]
                if r["accuracy"] is not None) if any(run["summary"]["labelled"] for run in runs) else None
    summary = f"{len(runs)} attack run{'s' if len(runs) > 1 else ''}"
    if worst:
        summary += f"; lowest top-1 {worst[0]:.3f} ({worst[2]}, eps {worst[1]})"
    return Section("adversarial", "Robustness", "adversarial.html", summary,
                   {"runs": [r["group"] for r in runs]})
