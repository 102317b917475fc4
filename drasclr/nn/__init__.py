"""Neural-network building blocks: Loc-CondConv (Yu et al. 2023, Section 2.2, eqs. 3-4) and the
DrasCLR encoder (Section 3; docs/method.md#encoder) with its conditioning variants."""
from drasclr.nn.conditioning import CONDITIONINGS, HyperConv3d, PlainConv3d
from drasclr.nn.encoder import Encoder
from drasclr.nn.grouped_conv import InterleavedGroups, conv3d_by_group, interleave
from drasclr.nn.grouping import LandmarkGroups, as_groups
from drasclr.nn.loc_cond_conv import BACKENDS, LocCondConv3d, loc_cond_conv3d

__all__ = [
    "BACKENDS", "CONDITIONINGS", "Encoder", "HyperConv3d", "InterleavedGroups",
    "LandmarkGroups", "LocCondConv3d", "PlainConv3d", "as_groups", "conv3d_by_group",
    "interleave", "loc_cond_conv3d",
]
