"""Neural-network building blocks: Loc-CondConv (Yu et al. 2023, Section 2.2, eqs. 3-4), the
DrasCLR encoder (Section 3; docs/method.md#encoder) with its conditioning variants (Section
4.4.1), and the float64 reference of Loc-CondConv that tests and benchmarks compare against."""
from drasclr.conv_common import LandmarkPartition
from drasclr.nn.conditioning import CONDITIONINGS, HyperConv3d, PlainConv3d
from drasclr.nn.encoder import Encoder
from drasclr.nn.loc_cond_conv import BACKENDS, LocCondConv3d, loc_cond_conv3d
from drasclr.nn.reference import reference_loc_cond_conv3d

__all__ = [
    "BACKENDS", "CONDITIONINGS", "Encoder", "HyperConv3d", "LandmarkPartition", "LocCondConv3d",
    "PlainConv3d", "loc_cond_conv3d", "reference_loc_cond_conv3d",
]
