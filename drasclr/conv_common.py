"""Helpers shared by ``drasclr.nn`` and ``drasclr.kernels``, below both (imports neither).

Convolution arguments as 3-tuples, and the grouping of a batch by landmark. Samples of one
landmark share the same atlas coordinate and hence, in Loc-CondConv, exactly the same mixed
kernel (Yu et al. 2023, Section 2.2, eq. 3-4). Every backend exploits that: the routing and the
kernel mixture run once per distinct landmark, and the convolution runs over the samples of a
landmark together. ``LandmarkPartition`` holds that partition; the encoder builds it once in its
``forward`` and hands it to each layer, so the (host-synchronising) ``torch.unique`` runs once
per batch, not once per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

IntOrTriple = Union[int, Sequence[int]]


#: The smallest valid value of each convolution argument (as ``nn.Conv3d``).
CONV_ARGUMENT_MINIMUM = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}


def as_triple(value: IntOrTriple, name: str) -> tuple[int, int, int]:
    """An int or a 3-sequence of ints as a 3-tuple; ValueError naming ``name`` otherwise,
    also when ``name`` is a convolution argument below its minimum (``CONV_ARGUMENT_MINIMUM``)."""
    triple = (value, value, value) if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in triple):
        raise ValueError(f"{name}: expected an int or 3 ints, got {value!r}")
    minimum = CONV_ARGUMENT_MINIMUM.get(name)
    if minimum is not None and min(triple) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)  # compared by identity: fields are tensors
class LandmarkPartition:
    """Partition of a batch of ``batch_size`` samples into ``G`` landmark groups.

    Attributes:
        coords: (G, 3) the distinct normalised atlas coordinates, one row per group.
        index: (B,) long, the group of each sample.
        order: (B,) long, sample indices sorted by group (stable), so that
            ``x[order]`` lists group 0's samples first, then group 1's, ...
        offsets: (G + 1,) long on the device: group g occupies ``order[offsets[g]:offsets[g+1]]``.
        counts: samples per group, as host integers (needed to plan the convolution calls).
    """

    coords: Tensor
    index: Tensor
    order: Tensor
    offsets: Tensor
    counts: tuple[int, ...]

    @property
    def num_landmarks(self) -> int:
        return len(self.counts)

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])

    @property
    def uniform(self) -> bool:
        """True when every landmark has the same number of samples."""
        return min(self.counts) == max(self.counts)

    @classmethod
    def from_loc(cls, loc: Tensor, batch_size: int) -> "LandmarkPartition":
        """Group a batch by its landmark coordinates.

        Args:
            loc: (B, 3) normalised atlas coordinates, or (3,) for the whole batch.
            batch_size: B, the number of samples the coordinates belong to.
        """
        loc = check_loc(loc, batch_size)
        if loc.dim() == 1:
            device = loc.device
            return cls(
                coords=loc[None],
                index=torch.zeros(batch_size, dtype=torch.long, device=device),
                order=torch.arange(batch_size, device=device),
                offsets=torch.tensor([0, batch_size], device=device),
                counts=(batch_size,),
            )
        coords, index, counts = torch.unique(loc, dim=0, return_inverse=True, return_counts=True)
        offsets = torch.zeros(len(counts) + 1, dtype=torch.long, device=loc.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(
            coords=coords,
            index=index,
            order=torch.argsort(index, stable=True),
            offsets=offsets,
            counts=tuple(counts.tolist()),
        )


def check_loc(loc: Tensor, batch_size: int) -> Tensor:
    """Validate landmark coordinates: (B, 3) or (3,), floating point, finite."""
    if not isinstance(loc, Tensor):
        raise ValueError(f"loc: expected a tensor of atlas coordinates, got {type(loc).__name__}")
    if not loc.is_floating_point():
        raise ValueError(f"loc: expected floating-point coordinates, got dtype {loc.dtype}")
    if loc.shape != (3,) and loc.shape != (batch_size, 3):
        raise ValueError(
            f"loc: expected shape ({batch_size}, 3) or (3,) for a batch of {batch_size}, "
            f"got {tuple(loc.shape)}"
        )
    if not bool(torch.isfinite(loc).all()):
        raise ValueError("loc: coordinates must be finite, found NaN or inf")
    return loc


def as_partition(loc: "Tensor | LandmarkPartition", batch_size: int) -> LandmarkPartition:
    """Accept either raw coordinates or an already computed grouping."""
    if isinstance(loc, LandmarkPartition):
        if loc.batch_size != batch_size:
            raise ValueError(
                f"loc: grouping is for a batch of {loc.batch_size}, input has {batch_size} samples"
            )
        return loc
    return LandmarkPartition.from_loc(loc, batch_size)
