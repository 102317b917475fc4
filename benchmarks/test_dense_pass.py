"""The fully convolutional pass of ``dense_pass.py`` (benchmark only): the dilation trick
equals the strided network, and the agreement figures.

    .venv/bin/python -m pytest benchmarks/test_dense_pass.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dense_pass
from drasclr.nn import Encoder


def tiny_encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(rep_dim=8, moco_dim=4, num_experts=2, backend="grouped").eval()


def strided_valid(layers: list[tuple[nn.Module, nn.Module]], x: torch.Tensor,
                  coord: torch.Tensor) -> torch.Tensor:
    """The encoder's own strided layers without padding: on a crop starting at q its output 0
    is, by the shift-and-stitch argument, the dense output at q."""
    for conv, bn in layers:
        routing = torch.sigmoid(conv.routing(coord))
        weight = torch.einsum("e,e...->...", routing, conv.weight)
        x = F.elu(bn(F.conv3d(x, weight, conv.bias, stride=conv.stride)))
    return x


def encoder_pairs(encoder: Encoder) -> list[tuple[nn.Module, nn.Module]]:
    pairs = [(encoder.conv1, encoder.bn1), (encoder.conv2, encoder.bn2)]
    for block in (encoder.downsample1, encoder.downsample2, encoder.downsample3):
        pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2), (block.conv3, block.bn3)]
    return pairs + [(encoder.conv3, encoder.bn3), (encoder.conv4, encoder.bn4)]


def test_dilation_trick_equals_the_strided_network():
    encoder, coord = tiny_encoder(), torch.tensor([0.2, -0.4, 0.7])
    layers = dense_pass.dense_layers(encoder, coord)
    assert dense_pass.receptive_margin(layers) == 76
    assert [layer.dilation for layer in layers] == [1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16]
    x = torch.randn(1, 1, 30, 29, 28)
    with torch.no_grad():
        dense = dense_pass.run_dense(layers[:5], x)  # through downsample1: stride 4 in all
        strided = strided_valid(encoder_pairs(encoder)[:5], x, coord)
    np.testing.assert_allclose(dense[..., ::4, ::4, ::4].numpy(), strided.numpy(), atol=1e-5)


def test_agreement_figures():
    exact = np.array([0.1, 0.6, 0.7, 0.2, 0.9])
    scores = dense_pass.agreement(exact, exact)
    assert scores["pearson"] == pytest.approx(1.0) and scores["dice"] == 1.0
    shifted = dense_pass.agreement(np.array([0.1, 0.4, 0.7, 0.2, 0.9]), exact)
    assert shifted["dice"] == pytest.approx(2 * 2 / (2 + 3))
    assert shifted["max_abs"] == pytest.approx(0.2)
