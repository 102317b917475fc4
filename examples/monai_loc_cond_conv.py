"""LocCondConv3d inside a MONAI network: every Conv3d replaced, the coordinate passed through.

    python examples/monai_loc_cond_conv.py [--steps 60] [--batch-size 32] [--seed 0]

MONAI's networks call their convolutions as ``conv(x)``. ``LocationConditioned`` swaps every
``nn.Conv3d`` of a network for a ``LocCondConv3d`` of the same geometry (Yu et al. 2023,
Section 2.2: "we replace all static convolutional layers with Loc-CondConv layers") and, for
each forward pass, hands the batch's atlas coordinates to all of them.

The task is synthetic and needs the location: a patch of noise holds a blob at its centre,
bright or dark, and the label is 1 when the blob is bright on the left (first coordinate < 0)
or dark on the right. A network that ignores the location is at chance; the loss of the
conditioned MONAI ``Classifier`` falls within a few dozen steps; with ``--no-location`` the
unmodified network trains on the same batches for comparison.
"""
from __future__ import annotations

import argparse

import torch
from monai.networks.nets import Classifier
from torch import Tensor, nn

from drasclr.nn import LocCondConv3d


class LocationConditioned(nn.Module):
    """``network`` with each ``nn.Conv3d`` replaced by a ``LocCondConv3d``; called as
    ``model(x, loc)`` with ``loc`` (B, 3) normalised atlas coordinates.

    The replaced layers keep their in/out channels, kernel size, stride, padding, dilation,
    channel groups and bias; their weights are new (``num_experts`` experts each).
    """

    def __init__(self, network: nn.Module, num_experts: int = 8) -> None:
        super().__init__()
        self.network = network
        self.loc: Tensor | None = None  # the current batch's coordinates, set in forward
        self.num_replaced = self._replace(network, num_experts)
        if self.num_replaced == 0:
            raise ValueError(f"{type(network).__name__} has no nn.Conv3d to replace")

    def _replace(self, module: nn.Module, num_experts: int) -> int:
        count = 0
        for name, child in module.named_children():
            if isinstance(child, nn.Conv3d):
                setattr(module, name, _CoordinateConv(child, self, num_experts))
                count += 1
            else:
                count += self._replace(child, num_experts)
        return count

    def forward(self, x: Tensor, loc: Tensor) -> Tensor:
        self.loc = loc
        try:
            return self.network(x)
        finally:
            self.loc = None  # never let a later call see this batch's coordinates


class _CoordinateConv(nn.Module):
    """A ``LocCondConv3d`` called as ``conv(x)``: it reads the coordinates of the batch
    from the ``LocationConditioned`` that owns it."""

    def __init__(self, conv: nn.Conv3d, owner: LocationConditioned, num_experts: int) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{conv}: only explicit zero padding can be replaced")
        self.layer = LocCondConv3d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, num_experts=num_experts)
        self._owner = [owner]  # a list, so that the owner is not registered as a submodule

    def forward(self, x: Tensor) -> Tensor:
        loc = self._owner[0].loc
        if loc is None:
            raise RuntimeError("call the LocationConditioned model as model(x, loc)")
        return self.layer(x, loc)


def synthetic_batch(landmarks: Tensor, batch_size: int, size: int, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(x, loc, label): noise patches at random ``landmarks`` (L, 3) with a centred blob whose
    meaning depends on the landmark's first coordinate."""
    loc = landmarks[torch.randint(0, len(landmarks), (batch_size,), generator=generator)]
    label = torch.randint(0, 2, (batch_size,), generator=generator)
    left = loc[:, 0] < 0
    bright = (label == 1) == left
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    radius2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    blob = torch.exp(-radius2 / (2 * (size / 6) ** 2))
    sign = torch.where(bright, 1.0, -1.0)
    x = torch.randn(batch_size, 1, size, size, size, generator=generator)
    return x + 2.0 * sign[:, None, None, None, None] * blob, loc, label


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=32, help="patches per step")
    parser.add_argument("--size", type=int, default=16, help="patch edge in voxels")
    parser.add_argument("--experts", type=int, default=4, help="experts per LocCondConv3d")
    parser.add_argument("--landmarks", type=int, default=8,
                        help="distinct atlas coordinates the patches come from")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--no-location", action="store_true",
                        help="train the unmodified network instead (it cannot see the location)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    network = Classifier(in_shape=(1, args.size, args.size, args.size), classes=2,
                         channels=(8, 16), strides=(2, 2))
    if args.no_location:
        model = network
    else:
        model = LocationConditioned(network, num_experts=args.experts)
        print(f"replaced {model.num_replaced} Conv3d layers of MONAI's Classifier by LocCondConv3d")
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)
    # Patches come from a fixed set of landmarks, as in DrasCLR; samples of one landmark
    # share a mixed kernel, which LocCondConv3d computes once per landmark in the batch.
    landmarks = torch.rand(args.landmarks, 3, generator=generator) * 2 - 1
    losses = []
    for step in range(args.steps):
        x, loc, label = synthetic_batch(landmarks, args.batch_size, args.size, generator)
        logits = model(x) if args.no_location else model(x, loc)
        loss = nn.functional.cross_entropy(logits, label)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1:4d}  loss {loss.item():.3f}")

    x, loc, label = synthetic_batch(landmarks, 256, args.size, generator)  # fresh samples
    model.eval()
    with torch.no_grad():
        logits = model(x) if args.no_location else model(x, loc)
    accuracy = (logits.argmax(1) == label).float().mean().item()
    print(f"accuracy on 256 new patches: {accuracy:.2f} (chance 0.5)")
    return {"model": model, "losses": losses, "accuracy": accuracy}


if __name__ == "__main__":
    main()
