"""Receptive-field boxes of VGG and AlexNet (random init) against gradient probing.

Probing needs a network whose gradient reaches every pixel the output depends on: the
features are copied with every conv weight made positive, ReLUs removed and max pools
replaced by average pools of the same geometry (a max pool routes the gradient to one
input only). The geometry (kernels, strides, padding, dilation) is unchanged, so the
non-zero input gradient of one output position is exactly its receptive field.
"""

import copy

import pytest
import torch
from torch import nn

from engine.models import load_model
from engine.receptive_field import receptive_fields


def linear_probe(features: nn.Sequential) -> nn.Sequential:
    probe = copy.deepcopy(features)
    for i, m in enumerate(probe):
        if isinstance(m, nn.ReLU):
            probe[i] = nn.Identity()
        elif isinstance(m, nn.MaxPool2d):
            probe[i] = nn.AvgPool2d(m.kernel_size, m.stride, m.padding)
        elif isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.abs_().add_(1e-3)
                m.bias.zero_()
    return probe.double()


@pytest.mark.parametrize("name, size, cases", [
    ("alexnet", 127, [(2, (0, 0)), (5, (3, 6)), (7, (6, 0)), (12, (1, 2))]),
    ("vgg16", 96, [(4, (0, 0)), (9, (11, 23)), (16, (5, 0)), (23, (2, 3)), (30, (1, 2))]),
])
def test_vgg_and_alexnet_boxes_match_gradient_probing(name, size, cases):
    model = load_model(name, require_weights=False)
    rfs = receptive_fields(model, size)
    probe = linear_probe(model.module.features)
    x = torch.rand(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    for index, (y, xx) in cases:
        out = probe[:index + 1](x)
        assert y < out.shape[2] and xx < out.shape[3], (name, index, out.shape)
        grad, = torch.autograd.grad(out[0, :, y, xx].sum(), x)
        nz = grad[0].abs().sum(0).nonzero()
        box = rfs[f"features.{index}"].box(y, xx, size, size)
        found = (nz[:, 0].min().item(), nz[:, 1].min().item(), nz[:, 0].max().item() + 1, nz[:, 1].max().item() + 1)
        assert found == box, (name, index, (y, xx), found, box)
