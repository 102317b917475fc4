"""pytest-benchmark: fused Triton Loc-CondConv against the grouped backend on the GPU.

Each encoder layer shape (docs/method.md#encoder), batch 128 as 16 landmarks x 8 subjects, bf16
autocast, forward+backward. Compare the two backends per layer in the pytest-benchmark table
(same run, same device). The standalone ``gpu_encoder_benchmark.py`` covers the full matrix.

    pytest benchmarks/bench_triton.py --benchmark-group-by=param:layer
"""
import pytest
import torch

from drasclr.nn import LandmarkPartition, LocCondConv3d

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

# (name, C_in, C_out, stride, input size): the encoder's convolutions, all 3x3x3 padding 1.
LAYERS = [
    ("conv1", 1, 8, 1, 32), ("conv2", 8, 8, 2, 32), ("downsample1.conv2", 16, 16, 1, 16),
    ("downsample2.conv2", 32, 32, 1, 8), ("downsample3.conv2", 64, 64, 1, 4),
    ("conv3", 64, 128, 1, 2), ("conv4", 128, 128, 2, 2),
]


@pytest.mark.parametrize("backend", ["triton", "grouped"])
@pytest.mark.parametrize("layer", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_layer_forward_backward(benchmark, layer, backend):
    _, c_in, c_out, stride, size = layer
    device = torch.device("cuda")
    conv = LocCondConv3d(c_in, c_out, 3, stride, 1, num_experts=8, backend=backend).to(device)
    labels = torch.arange(128, device=device) // 8  # 16 landmarks x 8 subjects
    loc = torch.stack([labels / 15.0, -labels / 15.0, labels % 3 / 3.0], dim=1)
    partition = LandmarkPartition.from_loc(loc, 128)
    x = torch.randn(128, c_in, size, size, size, device=device, requires_grad=True)
    params = list(conv.parameters())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = conv(x, partition)
        torch.autograd.grad(y.float().square().mean(), [x, *params])
        torch.cuda.synchronize()

    step()  # autotune and compile outside the timed rounds
    benchmark.pedantic(step, rounds=20, iterations=5, warmup_rounds=2)
