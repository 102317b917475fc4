"""LocCondConv3d: every backend against the float64 reference (drasclr.nn.reference)."""
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from drasclr.conv_common import as_partition
from drasclr.nn import LocCondConv3d, loc_cond_conv3d, reference_loc_cond_conv3d
from drasclr.nn import loc_cond_conv as lcc
from drasclr.nn.grouped_conv import interleave


def landmark_batch(layout: str, generator: torch.Generator) -> torch.Tensor:
    """(B, 3) coordinates whose landmark groups follow ``layout``, in shuffled sample order."""
    group_of_sample = {
        "single_sample": [0],
        "all_same": [0] * 5,
        "all_distinct": list(range(5)),
        "uneven": [0, 1, 1, 2, 2, 2, 3, 3, 3, 4],  # sizes 1, 2, 3, 3, 1: three buckets
    }[layout]
    coords = torch.rand(max(group_of_sample) + 1, 3, generator=generator) * 2 - 1
    group_of_sample = torch.tensor(group_of_sample)
    return coords[group_of_sample[torch.randperm(len(group_of_sample), generator=generator)]]


CONV_CASES = [  # (C_in, C_out, kernel, stride, padding, dilation, groups)
    (3, 4, 3, 1, 1, 1, 1),
    (2, 5, 3, 2, 0, 1, 1),
    (4, 6, 3, 2, 1, 2, 2),
    (3, 2, 1, 1, 0, 1, 1),
    (2, 4, 2, 1, 1, 1, 2),
]


@pytest.mark.parametrize("layout", ["single_sample", "all_same", "all_distinct", "uneven"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_backends_match_float64_formula(case, layout):
    c_in, c_out, k, stride, padding, dilation, groups = case
    generator = torch.Generator().manual_seed(zlib.crc32(repr((case, layout)).encode()))
    loc = landmark_batch(layout, generator)
    layer = LocCondConv3d(c_in, c_out, k, stride, padding, dilation, groups, num_experts=3)
    with torch.no_grad():  # routing spread wide enough that landmarks differ clearly
        layer.routing.weight.normal_(0, 2, generator=generator)
    x = torch.randn(loc.shape[0], c_in, 6, 7, 5, generator=generator)
    expected = reference_loc_cond_conv3d(x, loc, layer.weight, layer.routing.weight, layer.routing.bias,
                         layer.bias, stride, padding, dilation, groups)
    for backend in ("loop", "grouped", "auto"):
        layer.backend = backend
        torch.testing.assert_close(layer(x, loc).double(), expected, rtol=1e-4, atol=1e-5)
        layer.double()
        torch.testing.assert_close(layer(x.double(), loc.double()), expected,
                                   rtol=1e-10, atol=1e-12)
        layer.float()


def test_loc_forms_agree():
    """(3,) for the batch, (B, 3), a LandmarkPartition and an interleaved grouping: same output."""
    generator = torch.Generator().manual_seed(1)
    layer = LocCondConv3d(2, 3, 3, padding=1, num_experts=4).double()
    x = torch.randn(4, 2, 5, 5, 5, dtype=torch.double, generator=generator)
    point = torch.rand(3, dtype=torch.double, generator=generator)
    expected = reference_loc_cond_conv3d(x, point.expand(4, 3), layer.weight, layer.routing.weight,
                         layer.routing.bias, layer.bias, 1, 1, 1, 1)
    for loc in (point, point.expand(4, 3), as_partition(point, 4)):
        torch.testing.assert_close(layer(x, loc), expected)

    loc = landmark_batch("uneven", generator).double()
    x = torch.randn(loc.shape[0], 2, 5, 5, 5, dtype=torch.double, generator=generator)
    expected = layer(x, loc)
    perm, interleaved = interleave(as_partition(loc, loc.shape[0]))
    for backend in ("loop", "grouped"):
        layer.backend = backend
        torch.testing.assert_close(layer(x[perm], interleaved), expected[perm])


def test_grouping_is_interleaved_by_bucket():
    """Bucket b holds sample i of every member group at start + i * G_b + j."""
    loc = landmark_batch("uneven", torch.Generator().manual_seed(2))
    partition = as_partition(loc, loc.shape[0])
    perm, interleaved = interleave(partition)
    assert sorted(perm.tolist()) == list(range(loc.shape[0]))
    assert sorted(b.count for b in interleaved.buckets) == [1, 2, 3]
    for bucket in interleaved.buckets:
        members = bucket.members.tolist()
        span = interleaved.index[bucket.start:bucket.start + bucket.count * len(members)]
        assert span.view(bucket.count, len(members)).tolist() == [members] * bucket.count
    torch.testing.assert_close(interleaved.coords[interleaved.index], loc[perm])


@pytest.mark.parametrize("layout", ["all_same", "uneven"])
def test_gradcheck_float64(layout):
    generator = torch.Generator().manual_seed(3)
    loc = landmark_batch(layout, generator).double()
    x = torch.randn(loc.shape[0], 2, 2, 3, 2, dtype=torch.double, generator=generator)
    weight = torch.randn(3, 2, 1, 2, 2, 2, dtype=torch.double, generator=generator)
    routing_weight = torch.randn(3, 3, dtype=torch.double, generator=generator)
    routing_bias = torch.randn(3, dtype=torch.double, generator=generator)
    bias = torch.randn(2, dtype=torch.double, generator=generator)
    inputs = [t.requires_grad_() for t in (x, weight, routing_weight, routing_bias, bias)]
    for backend in ("grouped", "loop"):
        assert torch.autograd.gradcheck(
            lambda x, w, rw, rb, b, backend=backend: loc_cond_conv3d(
                x, loc, w, rw, rb, b, stride=(1, 2, 1), padding=1, groups=2, backend=backend),
            inputs, fast_mode=True)


def test_experts_and_bias_initialised_like_conv3d():
    torch.manual_seed(4)
    conv = torch.nn.Conv3d(6, 5, 3)
    torch.manual_seed(4)
    layer = LocCondConv3d(6, 5, 3, num_experts=4)
    torch.testing.assert_close(layer.weight[0], conv.weight, rtol=0, atol=0)
    bound = 1 / math.sqrt(6 * 27)  # nn.Conv3d's bound: fan-in of one expert
    for expert in layer.weight:
        assert expert.abs().max() <= bound and expert.abs().max() > 0.95 * bound
        assert abs(expert.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert layer.bias.abs().max() <= bound
    assert not torch.equal(layer.weight[0], layer.weight[1])


def test_triton_falls_back_with_one_warning_per_reason():
    """groups > 1 is outside the fused kernels: "triton" warns once, then runs "grouped"."""
    lcc._warn_fallback_once.cache_clear()
    generator = torch.Generator().manual_seed(5)
    layer = LocCondConv3d(4, 4, 3, padding=1, groups=2, num_experts=2, backend="triton")
    loc = landmark_batch("uneven", generator)
    x = torch.randn(loc.shape[0], 4, 4, 4, 4, generator=generator)
    with pytest.warns(RuntimeWarning, match="groups=2") as record:
        out = layer(x, loc)
        layer(x, loc)
    assert len(record) == 1
    layer.backend = "grouped"
    torch.testing.assert_close(out, layer(x, loc))


def test_auto_on_cpu_is_grouped_without_warning():
    layer = LocCondConv3d(2, 2, 3, groups=2)
    x, loc = torch.randn(2, 2, 4, 4, 4), torch.rand(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = layer(x, loc)
    layer.backend = "grouped"
    torch.testing.assert_close(layer(x, loc), expected)


@pytest.mark.parametrize("make_call, message", [
    (lambda layer, x, loc: layer(x, torch.rand(3, 2)), "loc: expected shape"),
    (lambda layer, x, loc: layer(x, torch.rand(4, 3)), r"loc: expected shape \(3, 3\)"),
    (lambda layer, x, loc: layer(x, torch.tensor([0.0, float("nan"), 1.0])), "finite"),
    (lambda layer, x, loc: layer(x, torch.ones(3, 3, dtype=torch.long)), "floating"),
    (lambda layer, x, loc: layer(x[:, :1], loc), "x: expected 2 channels"),
    (lambda layer, x, loc: layer(x[0], loc), "x: expected a 5-D tensor"),
    (lambda layer, x, loc: layer(x[:2], as_partition(loc, 3)), "grouping is for a batch of 3"),
    (lambda layer, x, loc: setattr(layer, "backend", "cuda"), "backend: expected one of"),
    (lambda layer, x, loc: LocCondConv3d(2, 3, 3, groups=2), "groups: 2 must divide"),
    (lambda layer, x, loc: loc_cond_conv3d(x, loc, layer.weight, layer.routing.weight[:, :2],
                                           layer.routing.bias), "routing_weight"),
    (lambda layer, x, loc: loc_cond_conv3d(x, loc, layer.weight, layer.routing.weight,
                                           layer.routing.bias, backend="fast"), "backend"),
])
def test_bad_input_names_argument(make_call, message):
    layer = LocCondConv3d(2, 4, 3, num_experts=3)
    x, loc = torch.randn(3, 2, 4, 4, 4), torch.rand(3, 3)
    with pytest.raises(ValueError, match=message):
        make_call(layer, x, loc)


def test_module_state_dict_names():
    layer = LocCondConv3d(3, 5, 3, num_experts=8)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {"weight": (8, 5, 3, 3, 3, 3), "bias": (5,),
                      "routing.weight": (8, 3), "routing.bias": (8,)}


@pytest.mark.parametrize("backend", ["auto", "grouped", "loop"])
def test_backends_on_device(device, backend, monkeypatch, request):
    """On CUDA "auto" is the fused Triton path where it covers the call; same numbers."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 on CUDA
    precision = torch.get_float32_matmul_precision()
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(precision))
    torch.set_float32_matmul_precision("highest")
    generator = torch.Generator().manual_seed(6)
    loc = landmark_batch("uneven", generator)
    layer = LocCondConv3d(3, 4, 3, stride=2, padding=1, num_experts=3, backend=backend)
    x = torch.randn(loc.shape[0], 3, 6, 6, 6, generator=generator)
    expected = reference_loc_cond_conv3d(x, loc, layer.weight, layer.routing.weight, layer.routing.bias,
                         layer.bias, 2, 1, 1, 1)
    out = layer.to(device)(x.to(device), loc.to(device))
    assert out.device.type == device.type
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("layout", ["all_distinct", "uneven"])
def test_tiny_outputs_batched_matmul_path(layout):
    """Groups whose output is at most GEMM_MAX_COLUMNS columns (here 1 sample x 2^3 voxels)
    take the batched-matmul path; values and gradients still follow the formula."""
    generator = torch.Generator().manual_seed(7)
    loc = landmark_batch(layout, generator).double()
    x = torch.randn(loc.shape[0], 3, 3, 4, 3, dtype=torch.double, generator=generator)
    weight = torch.randn(2, 4, 3, 3, 3, 3, dtype=torch.double, generator=generator)
    routing_weight = torch.randn(2, 3, dtype=torch.double, generator=generator)
    routing_bias = torch.randn(2, dtype=torch.double, generator=generator)
    bias = torch.randn(4, dtype=torch.double, generator=generator)
    expected = reference_loc_cond_conv3d(x, loc, weight, routing_weight, routing_bias, bias, 2, 1, 1, 1)
    out = loc_cond_conv3d(x, loc, weight, routing_weight, routing_bias, bias, stride=2,
                          padding=1, backend="grouped")
    assert out.shape[2:] == (2, 2, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    inputs = [t.requires_grad_() for t in (x, weight, routing_weight, routing_bias, bias)]
    assert torch.autograd.gradcheck(
        lambda x, w, rw, rb, b: loc_cond_conv3d(x, loc, w, rw, rb, b, stride=2, padding=1,
                                                backend="grouped"),
        inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_bfloat16_autocast_matches_float64_formula(backend):
    """Under autocast the routing comes out in bf16; the mixture must still work and agree."""
    generator = torch.Generator().manual_seed(11)
    layer = LocCondConv3d(3, 4, 3, padding=1, num_experts=3, backend=backend)
    loc = landmark_batch("uneven", generator)
    x = torch.randn(loc.shape[0], 3, 5, 5, 5, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, loc)
    expected = reference_loc_cond_conv3d(x, loc, layer.weight, layer.routing.weight, layer.routing.bias,
                         layer.bias, 1, 1, 1, 1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("argument,value,message", [
    ("kernel_size", 0, "kernel_size: expected values >= 1"),
    ("kernel_size", (3, -1, 3), "kernel_size: expected values >= 1"),
    ("stride", 0, "stride: expected values >= 1"),
    ("stride", (1, 1, -2), "stride: expected values >= 1"),
    ("dilation", 0, "dilation: expected values >= 1"),
    ("padding", -1, "padding: expected values >= 0"),
    ("padding", (0, 0, 1.5), "padding: expected an int or 3 ints"),
    ("stride", True, "stride: expected an int or 3 ints"),
])
def test_layers_refuse_bad_geometry_when_built(argument, value, message):
    """Bad geometry is refused at construction with the argument's name, by the
    layer, the hypernetwork variant and the functional form alike."""
    from drasclr.nn.conditioning import HyperConv3d

    arguments = {"kernel_size": 3, argument: value}
    with pytest.raises(ValueError, match=message):
        LocCondConv3d(2, 4, **arguments)
    if argument != "dilation":
        with pytest.raises(ValueError, match=message):
            HyperConv3d(2, 4, **arguments)
    if argument != "kernel_size":
        layer = LocCondConv3d(2, 4, 3)
        with pytest.raises(ValueError, match=message):
            loc_cond_conv3d(torch.randn(2, 2, 6, 6, 6), torch.rand(2, 3), layer.weight,
                            layer.routing.weight, layer.routing.bias, **{argument: value})


@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_empty_batch_and_too_small_input(backend):
    """An empty batch gives an empty output shaped like nn.Conv3d's (and an empty encoder batch
    an empty representation); an input smaller than the kernel gets a message, not a crash."""
    from drasclr.nn import Encoder

    layer = LocCondConv3d(2, 4, 3, stride=2, padding=1, backend=backend)
    reference = torch.nn.Conv3d(2, 4, 3, stride=2, padding=1)
    empty = torch.randn(0, 2, 7, 6, 5)
    assert layer(empty, torch.rand(0, 3)).shape == reference(empty).shape == (0, 4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"spatial size \(1, 6, 6\) \(padded \(3, 8, 8\)\) is "
                                         r"smaller than the kernel's extent \(5, 5, 5\)"):
        LocCondConv3d(2, 4, 3, dilation=2, padding=1, backend=backend)(
            torch.randn(2, 2, 1, 6, 6), torch.rand(2, 3))
    encoder = Encoder(rep_dim=16, moco_dim=8, backend=backend)
    assert encoder(torch.randn(0, 1, 32, 32, 32), torch.rand(0, 3)).shape == (0, 16)


def test_reference_is_the_papers_formula():
    """With one expert, eq. 3-4 reduce to sigmoid(w . p + b) * conv3d(x, W) + bias per sample:
    the reference checked against that closed form, independently of the library."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 5, 4, 6, generator=generator)
    loc = torch.rand(3, 3, generator=generator) * 2 - 1
    weight = torch.randn(1, 4, 2, 3, 3, 3, generator=generator)
    routing_weight, routing_bias = torch.randn(1, 3, generator=generator), torch.randn(1, generator=generator)
    bias = torch.randn(4, generator=generator)
    scale = torch.sigmoid(loc.double() @ routing_weight.double()[0] + routing_bias.double())
    expected = (scale[:, None, None, None, None] * F.conv3d(x.double(), weight[0].double(), padding=1)
                + bias.double()[:, None, None, None])
    actual = reference_loc_cond_conv3d(x, loc, weight, routing_weight, routing_bias, bias, padding=1)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
