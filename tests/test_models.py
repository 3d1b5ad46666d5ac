"""Model registry, weights loading and receptive fields."""

import subprocess
import warnings

import pytest
import torch

from conftest import neurocat_cmd
from engine.classes import imagenet_classes
from engine.errors import InputError
from engine.hooks import capture, hook_count
from engine.models import load_model
from engine.receptive_field import receptive_fields


def test_classes_are_torchvision_order():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert list(classes.wnids) == sorted(classes.wnids)
    assert classes.wnids[0] == "n01440764" and classes.names[0] == "tench"


def test_shipped_model_declares_what_jobs_need(model):
    assert model.weights_sha256 and len(model.weights_sha256) == 64
    assert model.resolve("fc7") == "_avg_pooling"
    desc = model.describe()
    assert desc["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and desc["preprocessing"]["crop"] == 224
    before = hook_count(model.module)
    with capture(model.module, [model.resolve("fc7")]) as acts, torch.no_grad():
        model.module(torch.zeros(2, 3, 224, 224))
    assert acts["_avg_pooling"].shape == (2, 1280, 1, 1)
    assert hook_count(model.module) == before


def test_unknown_layer_is_a_clear_error(model):
    with pytest.raises(InputError, match="no layer"):
        model.resolve("conv99")


def test_missing_and_mismatched_weights(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model("alexnet", tmp_path / "nope.pth")
    with pytest.raises(InputError, match="needs --weights"):
        load_model("vgg16")
    resnet = load_model("resnet18", require_weights=False)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.module.state_dict(), path)
    with pytest.raises(InputError, match="does not fit"):
        load_model("alexnet", path)
    loaded = load_model("resnet18", path)
    for k, v in resnet.module.state_dict().items():
        assert torch.equal(v, loaded.module.state_dict()[k])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read"):
        load_model("resnet18", garbage)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(InputError) as refused, warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning on the way
        load_model("resnet18", path)
    # torch's own message advises weights_only=False, which would run the file's code
    assert "weights_only" not in str(refused.value) and "not a PyTorch state_dict" in str(refused.value)


def test_receptive_fields_match_known_values():
    vgg = receptive_fields(load_model("vgg16", require_weights=False))
    assert vgg["features.30"].size == (212, 212) and vgg["features.30"].stride == (32, 32)
    alex = receptive_fields(load_model("alexnet", require_weights=False))
    assert alex["features.0"].size == (11, 11) and alex["features.12"].size == (195, 195)


def test_receptive_field_boxes_match_gradient_probing(model):
    """The input pixels with non-zero gradient for one output position span the RF box."""
    rfs = receptive_fields(model)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    for layer, (y, xx) in [("_blocks.0", (0, 0)), ("_blocks.2", (20, 31)), ("_blocks.5", (13, 0)), ("_blocks.11", (3, 6))]:
        with capture(model.module, [layer], detach=False) as acts:
            with torch.enable_grad():
                model.module.requires_grad_(False)
                model.module(x)
        out = acts[layer]
        grad, = torch.autograd.grad(out[0, :, y, xx].sum(), x)
        nz = grad[0].abs().sum(0).nonzero()
        y0, x0, y1, x1 = rfs[layer].box(y, xx, 224, 224)
        assert (nz[:, 0].min().item(), nz[:, 1].min().item()) == (y0, x0), layer
        assert (nz[:, 0].max().item() + 1, nz[:, 1].max().item() + 1) == (y1, x1), layer


def test_layers_command():
    out = subprocess.run(neurocat_cmd() + ["layers", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    data = json.loads(out.stdout)
    by_name = {r["layer"]: r for r in data["layers"]}
    assert by_name["_conv_stem"]["shape"] == [32, 112, 112] and by_name["_conv_stem"]["rf_size"] == [3, 3]
    assert by_name["_fc"]["rf_size"] == "global"
    bad = subprocess.run(neurocat_cmd() + ["layers", "--model", "nonet"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown model" in bad.stderr and "Traceback" not in bad.stderr
    # sizes and counts below what they can mean: one line, exit 2 (were a traceback, or 0 meaning the default,
    # or a plan with negative seconds)
    for args in (["layers", "--input-size", "3"], ["layers", "--input-size", "0"],
                 ["plan", "--data", ".", "--images", "-5"]):
        bad = subprocess.run(neurocat_cmd() + args, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr, bad.stderr


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`neurocat layers | head -1`: the pipe closed under the table, and the command printed a
    BrokenPipeError traceback and "internal error" (exit 1). It ends quietly now."""
    proc = subprocess.Popen(neurocat_cmd() + ["layers"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # what `head` does once it has its lines: here before the table is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "internal error" not in err, err
