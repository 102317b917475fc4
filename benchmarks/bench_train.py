"""Training-step throughput (patches/s): our step against a reference-style step, same run.

Ours: landmark-grouped batch (4 landmarks x 4 subjects), "grouped" (CPU) or "auto" (GPU,
Triton) Loc-CondConv backend, bf16 autocast on GPU. Reference-style: one landmark per batch
(16 subjects), the "loop" backend (one sample at a time), float32. Both run the full step:
augmentation, query/neighbour/key encoders, both losses, enqueue, backward, SGD. The two steps
alternate (reference, ours, reference, ...; benchmarks/interleave.py) after one warm-up each;
the speed-up is the median of the per-round ratios, with their min-max.

    .venv/bin/python -m pytest benchmarks/bench_train.py --benchmark-only -s
"""
import torch

from drasclr.nn import Encoder
from drasclr.pretrain.augment import PatchAugment
from drasclr.pretrain.moco import DrasCLR
from interleave import interleave

BATCH, K_NEIGHBOURS, LANDMARKS, STEPS = 16, 2, 8, 5


def _step_fn(backend: str, landmarks_per_batch: int, device: torch.device, amp: bool):
    torch.manual_seed(0)
    model = DrasCLR(Encoder(backend=backend), LANDMARKS, queue_size=256).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    augment, generator = PatchAugment(), torch.Generator(device=device).manual_seed(0)
    coords = torch.rand(LANDMARKS, 3, device=device) * 2 - 1
    landmark = torch.arange(landmarks_per_batch, device=device).repeat_interleave(
        BATCH // landmarks_per_batch)
    neighbour = (landmark[:, None] + torch.arange(1, K_NEIGHBOURS + 1, device=device)) % LANDMARKS
    hu = (torch.randn(BATCH * (2 + K_NEIGHBOURS), 32, 32, 32, device=device) * 300 - 600).to(torch.int16)

    def step():
        views = augment(hu, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(views[:BATCH], views[BATCH:2 * BATCH],
                        views[2 * BATCH:].view(BATCH, K_NEIGHBOURS, 1, 32, 32, 32),
                        coords[landmark], coords[neighbour], landmark)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def test_train_step_throughput(benchmark):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    steps = {"reference": _step_fn("loop", 1, device, amp=False),
             "ours": _step_fn("auto" if gpu else "grouped", 4, device, amp=gpu)}
    rounds = benchmark.pedantic(lambda: interleave(steps, STEPS), rounds=1, iterations=1)
    rates = {name: BATCH / rounds.median(name) for name in steps}
    speedup = rounds.describe("reference", "ours")
    benchmark.extra_info.update(ours_patches_per_s=rates["ours"],
                                reference_patches_per_s=rates["reference"], speedup=speedup)
    print(f"\n{device}: ours {rates['ours']:.1f} patches/s, reference-style "
          f"{rates['reference']:.1f} patches/s (medians); ours / reference: {speedup}")
