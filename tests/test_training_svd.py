"""SVD adaptation of the encoder neck: exact at initialisation, only singular values train, merges back."""

from __future__ import annotations

import torch
from torch import nn

from training.finetune.svd_neck import SVDConv2d, SVDNeck


def _neck():
    from segment_anything.modeling.common import LayerNorm2d

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), LayerNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         LayerNorm2d(8))


def test_svd_neck_reproduces_the_neck_and_trains_only_singular_values():
    neck = _neck()
    svd = SVDNeck(neck)
    x = torch.randn(2, 12, 6, 6)
    assert torch.allclose(svd(x), neck(x), atol=1e-5)
    trainable = [p for p in svd.parameters() if p.requires_grad]
    assert len(trainable) == 2 and sum(p.numel() for p in trainable) == min(8, 12) + min(8, 72)
    assert all(p is q for p, q in zip(trainable, svd.trainable_parameters()))
    svd(x).square().mean().backward()
    assert all(p.grad is not None for p in trainable)


def test_merged_state_dict_loads_into_the_plain_neck():
    neck = _neck()
    svd = SVDNeck(neck)
    with torch.no_grad():
        for p in svd.trainable_parameters():  # non-uniform (a uniform scale is undone by the LayerNorms)
            p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    merged = svd.merged_state_dict(prefix="")
    assert set(merged) == set(neck.state_dict())
    plain = _neck()
    plain.load_state_dict(merged)
    x = torch.randn(1, 12, 5, 5)
    assert torch.allclose(plain(x), svd(x), atol=1e-5)
    assert not torch.allclose(plain(x), neck(x), atol=1e-3)


def test_svd_conv_weight_is_u_s_vt():
    conv = nn.Conv2d(4, 6, 3, bias=True)
    s = SVDConv2d(conv)
    assert torch.allclose(s.weight(), conv.weight, atol=1e-5)
