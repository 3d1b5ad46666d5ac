"""Capacity planning: how long and how much memory each stage of a job takes on a cluster.

A short calibration on this machine measures the per-image cost of decoding, of the
forward pass and of forward+backward for the chosen model. Per-device factors (below)
turn those into estimates for workers of another kind; the slowest stage bounds the run.

Device table (documented assumptions, not measurements; refine with `bench/scale.py`
on the real hardware):
  forward_img_s   EfficientNet-Lite0 forward throughput per GPU at batch 256, fp16,
                  channels-last (about 25 % of peak tensor throughput for a depthwise
                  net; ResNet-50 reaches ~3,000 img/s training on an A100 for scale)
  backward_x      forward+backward cost relative to forward
  decode_cores    CPU cores per GPU worker that decode JPEGs (each core decodes at the
                  rate measured here)
  mem_gib         device memory
  faiss_gflops    achieved GEMM throughput for exact kNN (fp32 on GPU)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

DEVICES = {
    "cpu": None,  # this machine as calibrated
    "h100": {"forward_img_s": 12000.0, "backward_x": 3.0, "decode_cores": 16, "mem_gib": 80, "faiss_gflops": 40000.0},
    "h200": {"forward_img_s": 13000.0, "backward_x": 3.0, "decode_cores": 16, "mem_gib": 141, "faiss_gflops": 40000.0},
    "a100": {"forward_img_s": 7000.0, "backward_x": 3.0, "decode_cores": 12, "mem_gib": 80, "faiss_gflops": 15000.0},
    "l4": {"forward_img_s": 2500.0, "backward_x": 3.0, "decode_cores": 8, "mem_gib": 24, "faiss_gflops": 20000.0},
    "t4": {"forward_img_s": 1500.0, "backward_x": 3.2, "decode_cores": 4, "mem_gib": 16, "faiss_gflops": 7000.0},
}


def explain_passes(methods: int = 5, faithfulness_steps: int = 10, road_fractions: int = 5,
                   gradients: int = 3) -> tuple[float, float]:
    """Per-image (forward, forward+backward) passes of `neurocat explain`: the prediction, the
    faithfulness curves' ends (the image, its blurred copy) and, for every method and the
    random reference, 2 (steps - 1) deletion/insertion points and ROAD's MoRF and LeRF points;
    `gradients` passes for the maps (the defaults: saliency, guided backprop and Grad-CAM one
    each; guided Grad-CAM is their product, CAM a forward only). The curves are nearly all of
    it: 172 forwards against 3 gradients with the defaults. ROAD's imputations and the
    GrabCut masks are counted apart (`explain_extras`)."""
    curves = (methods + 1) * (2 * (faithfulness_steps - 1) + 2 * road_fractions) if faithfulness_steps else 0
    return float(1 + (2 if faithfulness_steps else 0) + curves + 1), float(gradients)


def explain_extras(methods: int = 5, road_fractions: int = 5) -> dict[str, float]:
    """Per-image work of `neurocat explain` besides model passes: ROAD's noisy linear
    imputations (MoRF and LeRF at every fraction, for every method and the random reference:
    60 with the defaults; on the model's device) and one GrabCut mask (OpenCV, CPU cores)."""
    return {"imputation": float((methods + 1) * 2 * road_fractions), "segmentation": 1.0}


def adversarial_passes(eps_values: int = 4, steps: int = 10) -> tuple[float, float]:
    """Per-image passes of `neurocat render adversarial`: `steps` gradients per eps (PGD-10
    at 4 eps by default), and a forward on the clean and on every adversarial image."""
    return float(1 + eps_values), float(eps_values * steps)


# the audit's spurious-context check: Grad-CAM, then the image, its CAM region and the rest
# through the model, on up to this many images of each class (flows/audit.py's default)
AUDIT_CONTEXT_PER_CLASS = 4

# per-image model passes each job needs with its defaults: (forward passes, forward+backward
# passes); the audit's context sample is added by `plan`, which knows the number of classes
JOB_PASSES = {
    "predict": (1, 0),
    "catalog": (1.1, 0),  # second pass: only images in some top/bottom-K list, a small fraction
    "embed": (1, 0),
    "audit": (1, 0),
    "explain": explain_passes(),
    "adversarial": adversarial_passes(),
}
# per-image work besides model passes (counted per kind of work)
JOB_EXTRAS = {"explain": explain_extras()}


@dataclass(frozen=True)
class Calibration:
    """Seconds per image on this machine, measured now."""

    decode_s: float
    forward_s: float
    backward_s: float
    cores: int
    gemm_gflops: float
    imputation_s: float = 0.0  # one ROAD imputation of one image (engine.faithfulness.impute)
    segmentation_s: float = 0.0  # one GrabCut mask, wall time with this machine's cores busy


def _best_of(repeats: int, fn) -> float:
    """Least wall time of `repeats` calls: the machine's speed, not its other load."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(model, paths: list, batch_size: int = 16) -> Calibration:
    """Time decode (16 real images), forward and forward+backward (best of a few batches), a GEMM,
    ROAD's imputation (a batch) and GrabCut (as many real images as cores, at once)."""
    from engine.fast import gradient_forward
    from engine.faithfulness import impute
    from engine.images import ImageError, load_preprocessed
    from engine.inference import run_model
    from engine.segmentation import grabcut_masks

    sample = paths[:16]
    t0 = time.perf_counter()
    decoded_images = []
    for p in sample:
        try:
            decoded_images.append(load_preprocessed(p, model.preprocessing))
        except ImageError:
            continue
    decode_s = (time.perf_counter() - t0) / max(1, len(decoded_images)) if sample else 0.01
    x = torch.randn(batch_size, 3, model.preprocessing.crop, model.preprocessing.crop)
    with torch.inference_mode():  # the jobs' forward path (engine.inference: the fast form)
        run_model(model, x[:2])
        forward_s = _best_of(3, lambda: run_model(model, x)) / batch_size
    xb = x[: max(2, batch_size // 2)].clone().requires_grad_(True)
    grad_forward = gradient_forward(model)  # the attacks' and projections' gradient path
    grad_forward(xb[:2]).sum().backward()
    backward_s = _best_of(2, lambda: grad_forward(xb).max(dim=1).values.sum().backward()) / len(xb)
    a = np.random.default_rng(0).standard_normal((1024, 1280), dtype=np.float32)
    t0 = time.perf_counter()
    a @ a.T
    gemm = 2 * 1024 * 1024 * 1280 / (time.perf_counter() - t0) / 1e9
    # ROAD's imputation costs the same whatever is removed (a fixed number of sweeps)
    removed = (torch.rand(len(x), 1, *x.shape[2:], generator=torch.Generator().manual_seed(0)) < 0.5).float()
    imputation_s = _best_of(2, lambda: impute(x, removed)) / len(x)
    images = np.stack(decoded_images) if decoded_images else np.zeros((0, *x.shape[2:], 3), np.uint8)
    images = images[: torch.get_num_threads()]
    maps = np.random.default_rng(0).random(images.shape[:3], dtype=np.float32)
    t0 = time.perf_counter()
    grabcut_masks(images, maps)
    segmentation_s = (time.perf_counter() - t0) / len(images) if len(images) else 0.0
    return Calibration(decode_s, forward_s, backward_s, torch.get_num_threads(), gemm, imputation_s, segmentation_s)


def plan(n_images: int, jobs: list[str], workers: int, device: str, cal: Calibration,
         embed_dim: int = 1280, knn_k: int = 10, classes: int = 1000) -> dict:
    """Estimated seconds per stage and the bounding stage, for `workers` workers of `device`
    (`classes`: how many the dataset has, for the audit's per-class context sample)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
    spec = DEVICES[device]
    if spec is None:  # CPU workers like this machine: each worker gets its share of the cores
        forward_img_s = workers / cal.forward_s
        backward_img_s = workers / cal.backward_s
        decode_img_s = workers / cal.decode_s
        gflops = cal.gemm_gflops * workers
        mem_gib = None
    else:
        forward_img_s = spec["forward_img_s"] * workers
        backward_img_s = forward_img_s / spec["backward_x"]
        decode_img_s = spec["decode_cores"] * workers / cal.decode_s
        gflops = spec["faiss_gflops"]  # exact kNN runs on one device
        mem_gib = spec["mem_gib"]
    # the audit's context sample: decoded again, 3 forwards and a Grad-CAM each
    sampled = min(1.0, AUDIT_CONTEXT_PER_CLASS * classes / n_images) if "audit" in jobs and n_images else 0.0
    stages = {"decode": n_images * (1 + sampled) / decode_img_s}
    fwd = sum(JOB_PASSES[j][0] for j in jobs if j in JOB_PASSES) + 3 * sampled
    bwd = sum(JOB_PASSES[j][1] for j in jobs if j in JOB_PASSES) + sampled
    # the shared forward pass is computed once for predict/embed/audit
    shared = {"predict", "embed", "audit"} & set(jobs)
    fwd -= max(0, len(shared) - 1)
    stages["forward"] = n_images * fwd / forward_img_s
    if bwd:
        stages["backward"] = n_images * bwd / backward_img_s
    extras = {kind: sum(JOB_EXTRAS.get(j, {}).get(kind, 0.0) for j in jobs) for kind in ("imputation", "segmentation")}
    if extras["imputation"]:  # on the model's device, at its speed relative to a forward pass here
        stages["imputation"] = n_images * extras["imputation"] * cal.imputation_s / cal.forward_s / forward_img_s
    if extras["segmentation"]:  # on the worker's CPU cores
        cores = workers * (cal.cores if spec is None else spec["decode_cores"])
        stages["segmentation"] = n_images * extras["segmentation"] * cal.segmentation_s * cal.cores / cores
    if {"embed", "audit"} & set(jobs):
        stages["knn"] = 2.0 * n_images * n_images * embed_dim / (gflops * 1e9)
        stages["tsne"] = 2e-5 * n_images * math.log2(max(n_images, 2)) if "embed" in jobs else 0.0
    # decode overlaps the model passes; the rest runs after them
    overlapped = max(stages["decode"], stages["forward"] + stages.get("backward", 0.0))
    total = overlapped + sum(stages.get(k, 0.0) for k in ("imputation", "segmentation", "knn", "tsne"))
    bound = max(stages, key=stages.get)
    memory = {
        "features_gib": n_images * embed_dim * 2 / 2**30,
        "knn_index_gib": n_images * embed_dim * 4 / 2**30,
        "device_gib": mem_gib,
    }
    return {"images": n_images, "jobs": jobs, "workers": workers, "device": device,
            "stages_s": {k: round(v, 2) for k, v in stages.items()}, "total_s": round(total, 2),
            "bound_by": bound, "memory": {k: (round(v, 3) if v is not None else None) for k, v in memory.items()},
            "throughput_img_s": round(n_images / total, 1) if total else None}
