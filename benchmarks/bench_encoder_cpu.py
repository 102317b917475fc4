"""Encoder forward+backward per patch on CPU: Loc-CondConv backends vs plain convolution.

Batches of 64 patches (1 x 32^3) holding 1, 4, 16 or 64 distinct landmarks in equal shares,
plus 16 landmarks in random shares (several group sizes: the bucketed path). Compared:
    loop     the reference's per-sample Loc-CondConv (few rounds: it is slow);
    grouped  mixture once per landmark, one grouped convolution per group size;
    none     the same backbone with plain nn.Conv3d, the ceiling for any Loc-CondConv.
The ratios to "none" measured in the same run are printed at the end, from the fastest round
of each case: on a shared machine the minimum is the figure least disturbed by other jobs.

    .venv/bin/python -m pytest benchmarks/bench_encoder_cpu.py -p no:cacheprovider
"""
import pytest
import torch

from drasclr.nn import Encoder

BATCH = 64
LAYOUTS = ["1", "4", "16", "64", "16-uneven"]
ROUNDS = {"none": 5, "grouped": 5, "loop": 1}


def batch_locations(layout: str, generator: torch.Generator) -> torch.Tensor:
    """(BATCH, 3) coordinates of ``layout``: "G" equal shares of G landmarks, "G-uneven"
    random shares."""
    num_landmarks = int(layout.split("-")[0])
    coords = torch.rand(num_landmarks, 3, generator=generator) * 2 - 1
    if layout.endswith("uneven"):
        landmark = torch.randint(num_landmarks, (BATCH,), generator=generator)
    else:
        landmark = torch.arange(BATCH) % num_landmarks
    return coords[landmark]


@pytest.fixture(scope="module")
def per_patch_ms(request):
    """Collects the fastest round's time per patch of every case; prints the ratios at the end."""
    results: dict[tuple[str, str], float] = {}
    yield results
    lines = [f"\nencoder fwd+bwd per patch (fastest round), batch {BATCH}, "
             f"{torch.get_num_threads()} torch threads; ratio to conditioning='none' in this run:"]
    for layout in LAYOUTS:
        plain = results.get(("none", layout))
        cells = []
        for backend in ("none", "grouped", "loop"):
            ms = results.get((backend, layout))
            if ms is not None:
                ratio = f" ({ms / plain:.2f}x)" if plain else ""
                cells.append(f"{backend} {ms:.1f} ms{ratio}")
        if cells:
            lines.append(f"  landmarks {layout:>9}: " + ", ".join(cells))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even though the tests passed
        print("\n".join(lines))


@pytest.mark.parametrize("backend", ["none", "grouped", "loop"])
@pytest.mark.parametrize("layout", LAYOUTS)  # backends of one layout run back to back
def test_encoder_forward_backward(benchmark, per_patch_ms, backend, layout):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if backend == "none":
        encoder = Encoder(conditioning="none")
    else:
        encoder = Encoder(backend=backend)
    x = torch.randn(BATCH, 1, 32, 32, 32, generator=generator)
    loc = batch_locations(layout, generator)

    def step():
        encoder.zero_grad(set_to_none=True)
        encoder(x, loc).sum().backward()

    if backend != "loop":  # warm-up: allocator, oneDNN primitives (loop warms up in-round)
        step()
    benchmark.pedantic(step, rounds=ROUNDS[backend], iterations=1)
    per_patch_ms[(backend, layout)] = benchmark.stats.stats.min * 1e3 / BATCH
