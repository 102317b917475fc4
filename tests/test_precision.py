"""The CPU speed path: bfloat16 autocast chosen by rule, channels-last activations.

bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per value), so bf16 results are compared
with float64 references at a few 1e-2 of the output's scale, float32 and channels-last ones
at float32 tolerances.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drasclr import precision
from drasclr.conv_common import LandmarkPartition
from drasclr.features import extract_features
from drasclr.nn import Encoder
from drasclr.nn.grouped_conv import conv3d_by_landmark, is_channels_last
from drasclr.precision import cpu_has_native_bf16  # the real probe, before conftest patches it
from test_features import SMALL, calibrated_encoder, float64_patch_features, tiny_store  # noqa: F401

CL = torch.channels_last_3d


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU computes bf16 natively (autocast runs bf16 on any CPU, only slower);
    overrides conftest's ``float32_cpu``; and opt in to bf16 on the CPU."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv(precision.CPU_BF16_VARIABLE, "1")


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_where_the_cpu_has_it_and_the_workload_or_user_asks(monkeypatch,
                                                                                  native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.delenv(precision.CPU_BF16_VARIABLE, raising=False)
    assert precision.use_bf16("cpu") is False  # float32 by default on every CPU
    assert precision.use_bf16("cpu", cpu_default=True) is native  # a workload measured faster
    monkeypatch.setenv(precision.CPU_BF16_VARIABLE, "1")
    assert precision.use_bf16("cpu") is native
    assert precision.use_bf16(torch.device("cpu"), amp=False) is False
    with precision.autocast("cpu", precision.use_bf16("cpu")):
        y = F.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv(precision.CPU_BF16_VARIABLE, "0")  # the user's opt-out wins
    assert precision.use_bf16("cpu", cpu_default=True) is False


def test_a_malformed_opt_in_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_VARIABLE, "yes")
    with pytest.raises(ValueError, match="DRASCLR_CPU_BF16='yes'"):
        precision.use_bf16("cpu")


def test_the_probe_reads_the_cpu_flags():
    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    expected = bool({"avx512_bf16", "amx_bf16"} & flags) and torch.backends.mkldnn.is_available()
    assert cpu_has_native_bf16() is expected


def _random_batch(generator, batch=12, landmarks=3):
    x = torch.randn(batch, 1, 32, 32, 32, generator=generator, dtype=torch.float64)
    coords = torch.rand(landmarks, 3, generator=generator, dtype=torch.float64) * 2 - 1
    index = torch.randint(landmarks, (batch,), generator=generator)
    index[:landmarks] = torch.arange(landmarks)  # every landmark present, uneven groups
    return x, coords[index]


def test_channels_last_grouped_conv_matches_channels_first_with_gradients():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, 7, 7, 7, generator=generator, dtype=torch.float64)
    kernels = torch.randn(3, 5, 4, 3, 3, 3, generator=generator, dtype=torch.float64)
    bias = torch.randn(5, generator=generator, dtype=torch.float64)
    index = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 2, 2])  # counts 3, 2, 5: three buckets
    partition = LandmarkPartition.from_loc(torch.randn(3, 3, dtype=torch.float64)[index], 10)
    upstream = torch.randn(10, 5, 4, 4, 4, generator=generator, dtype=torch.float64)
    results = []
    for layout in (torch.contiguous_format, CL):
        xi = x.contiguous(memory_format=layout).requires_grad_()
        ki = kernels.clone().requires_grad_()
        y = conv3d_by_landmark(xi, ki, bias, partition, stride=2, padding=1)
        results.append((y, *torch.autograd.grad(y, (xi, ki), upstream)))
    for first, last in zip(*results):
        torch.testing.assert_close(last, first, rtol=1e-12, atol=1e-12)
    reference = torch.cat([F.conv3d(x[b:b + 1], kernels[partition.index[b]], bias, 2, 1)
                           for b in range(10)])
    torch.testing.assert_close(results[1][0], reference, rtol=1e-12, atol=1e-12)


def test_channels_last_encoder_gives_the_same_outputs_and_gradients():
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    encoder = Encoder(**SMALL, backend="grouped").double()
    x, loc = _random_batch(generator)
    results = []
    for channels_last in (False, True):
        encoder.channels_last = channels_last
        encoder.zero_grad()
        h = encoder(x, loc)
        h.square().sum().backward()
        results.append((h.detach(), encoder.conv2.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-10)


def test_channels_last_keeps_activations_channels_last():
    encoder = Encoder(**SMALL, backend="grouped")
    encoder.channels_last = True
    seen = []
    encoder.downsample1.conv2.register_forward_hook(lambda m, args, out: seen.append(out))
    x, loc = _random_batch(torch.Generator().manual_seed(1))
    encoder(x.float(), loc.float())
    assert is_channels_last(seen[0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_encoder_is_close_to_float64(channels_last):
    generator = torch.Generator().manual_seed(8)
    torch.manual_seed(1)
    encoder = Encoder(**SMALL, backend="grouped")  # train mode: batch statistics
    reference = Encoder(**SMALL, backend="grouped").double()
    reference.load_state_dict(encoder.state_dict())
    encoder.channels_last = channels_last
    x, loc = _random_batch(generator)
    with precision.autocast("cpu", True):
        h = encoder(x.float(), loc.float())
    expected = reference(x, loc)
    scale = expected.abs().max()
    assert (h.double() - expected).abs().max() < 5e-2 * scale
    # and bf16 is not float32 in disguise: its error is well above float32 rounding
    assert (h.double() - expected).abs().max() > 1e-5 * scale


def test_bf16_features_are_close_to_float32_and_float64(tiny_store, native_bf16):  # noqa: F811
    atlas, store = tiny_store
    encoder = calibrated_encoder(store, atlas)
    expected = float64_patch_features(encoder, store, atlas).mean(axis=1)
    fp32 = extract_features(encoder, store, device="cpu", progress=False, amp=False)
    bf16 = extract_features(encoder, store, device="cpu", progress=False)
    assert (fp32.metadata["dtype"], bf16.metadata["dtype"]) == ("float32", "bfloat16")
    scale = np.abs(expected).max()
    np.testing.assert_allclose(fp32.features, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(bf16.features - expected).max() < 3e-2 * scale
    assert np.abs(bf16.features - fp32.features).max() > 1e-6 * scale  # bf16 really ran
