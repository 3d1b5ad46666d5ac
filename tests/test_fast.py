"""The fast model path gives the eager model's results: logits, top-1, activations, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.fast import FastOptions, FusedConv, build_graph, fast_module
from engine.hooks import capture, hook_count
from engine.images import list_images, load_preprocessed
from engine.inference import run_model

NO_COMPILE = FastOptions(compile=False)
LAYERS = ("_blocks.5", "_blocks.5._bn1", "_blocks.5._depthwise_conv", "_conv_stem", "_bn0",
          "_conv_head", "_avg_pooling", "_blocks.15")


@pytest.fixture(scope="session")
def shared_batch(shared_images, model) -> torch.Tensor:
    """32 of the shared images (every eighth), normalised."""
    entries = list_images(shared_images)[::8][:32]
    images = np.stack([load_preprocessed(shared_images / e.path, model.preprocessing) for e in entries])
    return model.preprocessing.normalize(torch.from_numpy(images))


@pytest.fixture(scope="session")
def eager(model, shared_batch):
    """Plain eager logits and hooked activations: the reference."""
    with torch.inference_mode(), capture(model.module, list(LAYERS)) as acts:
        logits = model.module(shared_batch)
    return logits, dict(acts)


def test_fast_logits_and_top1_match_eager(model, shared_batch, eager):
    logits, _ = run_model(model, shared_batch, fast=NO_COMPILE)
    assert fast_module(model, options=NO_COMPILE).form == "fused"
    assert (logits - eager[0]).abs().max().item() < 1e-3
    assert torch.equal(logits.argmax(1), eager[0].argmax(1))


def test_every_requested_layer_returns_the_eager_tensor(model, shared_batch, eager):
    """Folding BN changes what a conv outputs; a requested conv keeps its BN apart, and a
    requested BN or block returns exactly what the eager forward hook sees."""
    _, acts = run_model(model, shared_batch, LAYERS, fast=NO_COMPILE)
    for name in LAYERS:
        ref = eager[1][name]
        assert acts[name].shape == ref.shape, name
        assert acts[name].is_contiguous(), name
        err = (acts[name] - ref).abs().max().item()
        assert err < 1e-3 * max(1.0, ref.abs().max().item()), (name, err)


def test_alias_and_unusual_layers(model, shared_batch, eager):
    """Aliases resolve; a layer the graph cannot return (a pad inside a conv, the ReLU6 reused
    by stem and head) falls back to eager hooks and still gives the eager tensor."""
    x = shared_batch[:4]
    with torch.inference_mode(), capture(model.module, ["_conv_stem.static_padding", "_swish"]) as ref:
        model.module(x)
    before = hook_count(model.module)
    _, acts = run_model(model, x, ("fc7", "_conv_stem.static_padding", "_swish"), fast=NO_COMPILE)
    assert hook_count(model.module) == before
    torch.testing.assert_close(acts["fc7"], eager[1]["_avg_pooling"][:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(acts["_conv_stem.static_padding"], ref["_conv_stem.static_padding"])
    torch.testing.assert_close(acts["_swish"], ref["_swish"])


def test_folded_graph_has_no_batch_norm_and_no_pad(model):
    folded = build_graph(model.module, (), NO_COMPILE)
    kinds = {type(m) for m in folded.modules()}
    assert nn.BatchNorm2d not in kinds and nn.ZeroPad2d not in kinds
    kept = build_graph(model.module, (), FastOptions(fold_bn=False, fold_padding=False, compile=False))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in kept.modules()) == 49
    assert sum(isinstance(m, nn.ZeroPad2d) for m in kept.modules()) == 17
    # the asymmetric stride-2 pads became a wider kernel with symmetric padding
    stem = folded.get_submodule("_conv_stem")
    assert type(stem) is nn.Conv2d and stem.kernel_size == (4, 4) and stem.padding == (1, 1)


def test_fused_graph_is_onednn_kernels_with_the_folded_results(model, shared_batch):
    """Every conv of the default form is one oneDNN call with its ReLU6 or residual add; a
    requested conv output stays unfused (the hook sees the conv, not the clamp)."""
    fm = fast_module(model, ("_conv_head",), options=NO_COMPILE)
    called = [fm.graph.get_submodule(n.target) for n in fm.graph.graph.nodes if n.op == "call_module"]
    convs = [m for m in called if isinstance(m, FusedConv)]
    assert len(convs) == 49 and not any(type(m) is nn.Conv2d for m in called)
    assert sum(isinstance(m, nn.ReLU6) for m in called) == 1  # the head's, after the requested conv
    assert "add" not in fm.graph.code
    assert sum(c.attr == "hardtanh" for c in convs) == 32 and sum(c.residual for c in convs) == 9
    assert fm.graph.get_submodule("_conv_head").attr == "none"
    folded = fast_module(model, ("_conv_head",), options=FastOptions(fuse=False, compile=False))
    assert folded.form == "folded"
    with torch.inference_mode():
        (logits, head), (ref_logits, ref_head) = fm.graph(shared_batch), folded.graph(shared_batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head, ref_head, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [
    FastOptions(fuse=False, compile=False),
    FastOptions(fold_bn=False, compile=False),
    FastOptions(fold_padding=False, compile=False),
    FastOptions(channels_last=False, compile=False),
    FastOptions.off(),
], ids=["no-fuse", "no-fold-bn", "no-fold-padding", "no-channels-last", "all-off"])
def test_each_optimisation_can_be_turned_off(model, shared_batch, eager, options):
    x = shared_batch[:16]
    logits, acts = run_model(model, x, ("_blocks.5",), fast=options)
    assert (logits - eager[0][:16]).abs().max().item() < 1e-3
    assert (acts["_blocks.5"] - eager[1]["_blocks.5"][:16]).abs().max().item() < 1e-3
    if options == FastOptions.off():
        assert fast_module(model, ("_blocks.5",), options=options).form == "eager"
        assert torch.equal(logits, eager[0][:16])  # plain eager, bit for bit


def test_flags_from_environment():
    assert FastOptions.from_env({}) == FastOptions()
    assert FastOptions.from_env({"NEUROCAT_FAST": "0"}) == FastOptions.off()
    assert not FastOptions.from_env({"NEUROCAT_FAST": "0"}).any
    assert FastOptions.from_env({"NEUROCAT_FAST_COMPILE": "0"}).compile is False
    assert FastOptions.from_env({"NEUROCAT_FAST_COMPILE": "auto"}).compile is None
    assert FastOptions.from_env({"NEUROCAT_FAST_FUSE": "0"}) == FastOptions(fuse=False)
    only_fold = FastOptions.from_env({"NEUROCAT_FAST": "0", "NEUROCAT_FAST_FOLD_BN": "1"})
    assert only_fold.fold_bn and not only_fold.channels_last and only_fold.compile is False


def test_run_model_uses_the_environment(model, shared_batch, monkeypatch):
    monkeypatch.setenv("NEUROCAT_FAST", "0")
    run_model(model, shared_batch[:2])
    assert fast_module(model).form == "eager"


def _saliency(forward, x):
    x = x.clone().requires_grad_(True)
    logits = forward(x)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    return x.grad.abs().amax(1)


def test_saliency_through_the_fast_path_matches_eager(model, shared_batch):
    """Gradients w.r.t. the input: folding is exact for them too (Grad-CAM, renders)."""
    x = shared_batch[:2]
    fm = fast_module(model, ("_conv_head",), for_grad=True, options=NO_COMPILE)
    assert fm.form == "fused"  # FusedConv's autograd function
    ours = _saliency(lambda t: fm(t)[0], x)
    ref = _saliency(model.module, x)
    for a, b in zip(ours, ref):
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert r >= 0.999
    # activations stay in the autograd graph (Grad-CAM)
    logits, acts = fm(x.clone().requires_grad_(True))
    assert acts["_conv_head"].requires_grad
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), acts["_conv_head"])
    assert grad.shape == acts["_conv_head"].shape and grad.abs().sum() > 0


@pytest.mark.parametrize("rule", [None, "guided", "deconvnet"])
def test_fused_backward_equals_the_folded_graphs_autograd(model, shared_batch, rule):
    """FusedConv's hand-written backward (mask from the saved output, aten's conv input
    gradient) against autograd through the unfused folded graph, for the input gradient of a
    logit and of an intermediate layer's unit, plain and under both ReLU backward rules."""
    from engine.backprop_rules import relu_backward_rule

    x = shared_batch[:4]
    fused = fast_module(model, ("_blocks.10",), for_grad=True, options=NO_COMPILE)
    folded = fast_module(model, ("_blocks.10",), for_grad=True, options=FastOptions(compile=False, fuse=False))
    assert (fused.form, folded.form) == ("fused", "folded")

    def gradients(fm):
        out = []
        for of_layer in (False, True):
            xg = x.clone().requires_grad_(True)
            with relu_backward_rule(fm.graph, rule) if rule else torch.enable_grad():
                logits, acts = fm(xg)
                score = acts["_blocks.10"][:, 3].sum() if of_layer else logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                out.append(torch.autograd.grad(score, xg)[0])
        return out

    for ours, ref in zip(gradients(fused), gradients(folded)):
        assert ref.abs().sum() > 0
        assert torch.allclose(ours, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    assert all(getattr(m, "relu_rule", None) is None for m in fused.graph.modules())  # rule restored


def test_mixed_precision_is_opt_in_and_keeps_top1(model, shared_batch, eager):
    """bf16 is off by default: its logits differ by about 0.1 (far from 1e-3)."""
    assert not FastOptions().amp
    logits, _ = run_model(model, shared_batch[:16], fast=FastOptions(amp=True, compile=False))
    assert logits.dtype == torch.float32
    agree = (logits.argmax(1) == eager[0][:16].argmax(1)).float().mean().item()
    assert agree >= 0.9


def test_catalogue_top_k_is_the_same(model, shared_batch, eager):
    """The catalogue's per-unit top-K / bottom-K images and argmax positions, fast vs eager."""
    from engine.topk import ChannelStats

    _, acts = run_model(model, shared_batch, ("_blocks.5", "_blocks.15"), fast=NO_COMPILE)
    index = np.arange(len(shared_batch))
    for layer in ("_blocks.5", "_blocks.15"):
        ours, ref = (ChannelStats.empty(a.shape[1], tuple(a.shape[2:]), 4, 2) for a in (acts[layer],) * 2)
        ours.add(acts[layer], index)
        ref.add(eager[1][layer], index)
        np.testing.assert_array_equal(ours.top_index, ref.top_index)
        np.testing.assert_array_equal(ours.bottom_index, ref.bottom_index)
        np.testing.assert_array_equal(ours.top_yx, ref.top_yx)
        np.testing.assert_allclose(ours.top_value, ref.top_value, atol=1e-3)


@pytest.mark.parametrize("name, layer, fused_relus", [("resnet18", "layer2", 9), ("alexnet", "features.3", 4)])
def test_fusion_on_other_architectures(shared_batch, name, layer, fused_relus):
    """ReLU after a conv (AlexNet's in-place ones, ResNet's shared module) fuses; ResNet's
    in-place residual `+=` stays a separate add; AlexNet's requested conv keeps its ReLU apart.
    Seeded random weights, so compared to scale."""
    from engine.models import load_model

    model = load_model(name, require_weights=False)
    x = shared_batch[:4]
    with torch.inference_mode(), capture(model.module, [layer]) as ref:
        ref_logits = model.module(x)
    fm = fast_module(model, (layer,), options=NO_COMPILE)
    convs = [m for m in fm.graph.modules() if isinstance(m, FusedConv)]
    assert fm.form == "fused" and sum(c.attr == "relu" for c in convs) == fused_relus
    logits, acts = run_model(model, x, (layer,), fast=NO_COMPILE)
    scale = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() < 1e-4 * scale
    assert torch.equal(logits.argmax(1), ref_logits.argmax(1))
    assert (acts[layer] - ref[layer]).abs().max().item() < 1e-4 * ref[layer].abs().max().item()


@pytest.mark.parametrize("fast", ["on", "off"])
@pytest.mark.parametrize("name, layers", [("alexnet", ("features.10", "features.12")),
                                          ("resnet18", ("layer4.1.bn2", "layer4.1"))])
def test_layers_the_net_changes_in_place_keep_their_own_output(shared_batch, name, layers, fast):
    """AlexNet's conv feeds ReLU(inplace=True), ResNet's bn2 feeds `out += identity`: asked
    together with a later layer, each layer still gives its own output (before the in-place op),
    on the fast path and on the eager one. Seeded random weights, so compared to scale."""
    from engine.hooks import forward_hooks
    from engine.models import load_model

    torch.manual_seed(0)
    model = load_model(name, require_weights=False)
    x = shared_batch[:2]
    ref = {}
    def keep(layer):
        def hook(_m, _i, out):
            ref[layer] = out.clone()
        return hook
    with torch.inference_mode(), forward_hooks(model.module, {layer: keep(layer) for layer in layers}):
        model.module(x)
    _, acts = run_model(model, x, layers, fast=NO_COMPILE if fast == "on" else FastOptions.off())
    for layer in layers:
        assert (acts[layer] - ref[layer]).abs().max().item() < 1e-4 * ref[layer].abs().max().item(), layer


def test_forwards_in_other_threads_run_untouched_while_a_graph_is_traced(model):
    """FX patches nn.Module.__call__ process-wide while it traces: two renders of different
    layers on the threads runner crashed ("module is not installed as a submodule") when one
    traced its graph while the other ran the model."""
    import threading

    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.module(x)
    errors, results, tracing = [], [], threading.Event()

    def forwards():
        tracing.wait()
        while tracing.is_set():
            try:
                with torch.no_grad():
                    results.append(model.module(x))
            except Exception as e:  # noqa: BLE001 - the failure under test
                errors.append(repr(e))
                return

    other = threading.Thread(target=forwards)
    other.start()
    tracing.set()
    try:
        for layers in [("_blocks.3",), ("_blocks.5",), ("_blocks.8",)]:
            build_graph(model.module, layers, FastOptions())
    finally:
        tracing.clear()
        other.join()
    assert not errors, errors[:1]
    assert results and all(torch.equal(r, expected) for r in results)


def test_graphs_traced_at_once_in_two_threads_leave_module_calls_unpatched(model):
    """Two traces at once stacked FX's process-wide patch of nn.Module.__call__, and the one
    restored last put the other's tracer back for good: every later forward in that thread
    failed."""
    from concurrent.futures import ThreadPoolExecutor

    call = nn.Module.__call__
    with ThreadPoolExecutor(4) as pool:
        graphs = list(pool.map(lambda layers: build_graph(model.module, layers, FastOptions()),
                               [("_blocks.3",), ("_blocks.5",), ("_blocks.8",), ("_blocks.10",)] * 2))
    assert nn.Module.__call__ is call
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(graphs[0](x)[0], model.module(x), atol=1e-4, rtol=1e-4)
