"""Encoder forward+backward per patch on CPU: Loc-CondConv backends vs plain convolution.

Batches of ``--batch`` patches (1 x 32^3) holding 1, 4, 16 or 64 distinct landmarks in equal
shares, plus 16 landmarks in random shares (several group sizes: the bucketed path). Compared:
    none     the same backbone with plain nn.Conv3d, the ceiling for any Loc-CondConv;
    grouped  mixture once per landmark, one grouped convolution per group size;
    loop     the authors' per-sample Loc-CondConv (``--no-loop`` leaves it out: it is slow).
For each layout the variants run interleaved round by round (none, grouped, loop, none, ...;
benchmarks/interleave.py); printed are the median time per patch and the median of the
per-round ratios to "none" with their min-max spread.

    .venv/bin/python benchmarks/bench_encoder_cpu.py [--rounds 7] [--batch 64] [--no-loop]
    make bench      # the same at --rounds 3 --batch 32, through pytest
"""
from __future__ import annotations

import argparse

import torch

from drasclr.nn import Encoder
from interleave import interleave

LAYOUTS = ["1", "4", "16", "64", "16-uneven"]


def batch_locations(layout: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 3) coordinates of ``layout``: "G" equal shares of G landmarks, "G-uneven"
    random shares."""
    num_landmarks = int(layout.split("-")[0])
    coords = torch.rand(num_landmarks, 3, generator=generator) * 2 - 1
    if layout.endswith("uneven"):
        landmark = torch.randint(num_landmarks, (batch,), generator=generator)
    else:
        landmark = torch.arange(batch) % num_landmarks
    return coords[landmark]


def forward_backward(encoder: Encoder, x: torch.Tensor, loc: torch.Tensor):
    def step():
        encoder.zero_grad(set_to_none=True)
        encoder(x, loc).sum().backward()
    return step


def measure(layouts: list[str], rounds: int, batch: int, loop: bool) -> list[str]:
    """Markdown table rows: layout, median ms per patch of each variant, ratios to none."""
    torch.manual_seed(0)
    encoders = {"none": Encoder(conditioning="none"), "grouped": Encoder(backend="grouped")}
    if loop:
        encoders["loop"] = Encoder(backend="loop")
        encoders["loop"].load_state_dict(encoders["grouped"].state_dict())
    rows = []
    for layout in layouts:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, 32, 32, 32, generator=generator)
        loc = batch_locations(layout, batch, generator)
        result = interleave({name: forward_backward(e, x, loc) for name, e in encoders.items()},
                            rounds)
        cells = [f"{result.median(name) * 1e3 / batch:.1f} ms" for name in encoders]
        ratios = [result.describe(name, "none") for name in encoders if name != "none"]
        if loop:
            ratios.append(result.describe("loop", "grouped"))
        rows.append(f"| {layout} | " + " | ".join(cells + ratios) + " |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per layout")
    parser.add_argument("--batch", type=int, default=64, help="patches per forward pass")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"landmark layouts of the batch, of {LAYOUTS}")
    parser.add_argument("--no-loop", action="store_true", help="leave out the loop backend")
    args = parser.parse_args(argv)
    layouts = args.layouts.split(",")
    names = ["none", "grouped"] + ([] if args.no_loop else ["loop"])
    print(f"encoder fwd+bwd, batch {args.batch}, {torch.get_num_threads()} torch threads, "
          f"{args.rounds} interleaved rounds; median ms per patch, ratio to none: median "
          "(min-max) of the per-round ratios")
    ratios = [f"{n} / none" for n in names[1:]] + ([] if args.no_loop else ["loop / grouped"])
    print("| landmarks | " + " | ".join([f"{n} ms/patch" for n in names] + ratios) + " |")
    print("|---" * (1 + len(names) + len(ratios)) + "|")
    return measure(layouts, args.rounds, args.batch, not args.no_loop)


def test_encoder_cpu(benchmark):
    """`make bench`: one small interleaved run, its table printed."""
    rows = benchmark.pedantic(lambda: main(["--rounds", "3", "--batch", "32"]), rounds=1,
                              iterations=1)
    assert len(rows) == len(LAYOUTS)


if __name__ == "__main__":
    main()
