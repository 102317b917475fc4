"""Does bf16 autocast training collapse? A store-free check for any device.

    python benchmarks/bf16_training_check.py [--device cuda] [--steps 12] [--runs 3]

On the 2-core CPU (AVX512_BF16) short `drasclr train` runs at 8 patches per step collapsed
under bf16 autocast in most runs: within 3-6 steps the loss fell from about 2 to about 0.4 and
the positive logit q.k rose to 0.99 (every embedding nearly the same), differently from run to
run with one seed, while float32 never did (benchmarks/RESULTS.md, "CPU ceiling, part 3").
This runs the same training step (DrasCLR with the Loc-CondConv encoder, 2 landmarks x 4
patches, 2 neighbours, queue 64, SGD lr 0.01) on random HU patches, ``--runs`` times in float32
and in bf16 from the same seed, and prints every step's loss and mean positive logit. A run
"collapsed" when its mean positive logit exceeds 0.95 at any step after the first or its loss
is not finite.
"""
from __future__ import annotations

import argparse
import math

import torch

from drasclr.nn import Encoder
from drasclr.pretrain.augment import PatchAugment
from drasclr.pretrain.moco import DrasCLR

LANDMARKS, PER_LANDMARK, NEIGHBOURS, NUM_LANDMARKS, QUEUE = 2, 4, 2, 8, 64
BATCH = LANDMARKS * PER_LANDMARK
COLLAPSED = 0.95


def run(device: torch.device, bf16: bool, steps: int, seed: int) -> list[tuple[float, float]]:
    """(loss, mean positive logit) of each step of one training run."""
    torch.manual_seed(seed)
    model = DrasCLR(Encoder(conditioning="loc_condconv"), NUM_LANDMARKS, queue_size=QUEUE).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                                momentum=0.9, weight_decay=1e-4)
    augment, generator = PatchAugment(), torch.Generator(device).manual_seed(seed)
    coords = (torch.rand(NUM_LANDMARKS, 3) * 2 - 1).to(device)
    history = []
    for step in range(steps):
        landmark = torch.randperm(NUM_LANDMARKS)[:LANDMARKS].repeat_interleave(PER_LANDMARK)
        neighbour = (landmark[:, None] + torch.arange(1, NEIGHBOURS + 1)) % NUM_LANDMARKS
        landmark, neighbour = landmark.to(device), neighbour.to(device)
        hu = (torch.randn(BATCH * (2 + NEIGHBOURS), 32, 32, 32) * 300 - 600).to(torch.int16)
        views = augment(hu.to(device), generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(views[:BATCH], views[BATCH:2 * BATCH],
                        views[2 * BATCH:].view(BATCH, NEIGHBOURS, 1, 32, 32, 32),
                        coords[landmark], coords[neighbour], landmark)
        # the positive logit q.k of this step's views, as the loss saw them (train mode)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            query = model.embed(model.encoder_q, views[:BATCH], coords[landmark])
            key = model.embed(model.encoder_k, views[BATCH:2 * BATCH], coords[landmark])
            positive = (query * key).sum(1).mean().item()
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        history.append((out.loss.item(), positive))
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    collapsed = {False: 0, True: 0}
    for index in range(args.runs):
        for bf16 in (False, True):
            history = run(device, bf16, args.steps, args.seed)
            collapse = any(not math.isfinite(loss) or positive > COLLAPSED
                           for loss, positive in history[1:])
            collapsed[bf16] += collapse
            print(f"run {index + 1} {'bf16' if bf16 else 'fp32'}: "
                  + " ".join(f"{loss:.2f}/{positive:.2f}" for loss, positive in history)
                  + ("  COLLAPSED" if collapse else ""), flush=True)
    print(f"{device}: collapsed runs (loss/positive logit per step above): "
          f"fp32 {collapsed[False]} of {args.runs}, bf16 {collapsed[True]} of {args.runs}")


if __name__ == "__main__":
    main()
