"""Checkpoints: the authors' layout (docs/method.md#the-authors-checkpoints) and our own
state-dict round trip.

``ReferenceMoCo`` below is an independent, per-sample re-statement of the reference semantics
(their layer names, ``_routing_fn.fc``, ``fc.0``/``fc.2``, MoCo wrapper with ``encoder_k``,
``queue``, ``queue_ptr``), used only to write a checkpoint in their layout.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drasclr import CheckpointError, load_encoder
from drasclr.checkpoint_formats import reference_state_dict_to_encoder
from drasclr.nn import Encoder


class _Routing(nn.Module):
    def __init__(self, num_experts):
        super().__init__()
        self.fc = nn.Linear(3, num_experts)


class ReferenceCondConv(nn.Module):
    def __init__(self, c_in, c_out, stride, num_experts):
        super().__init__()
        self.stride = stride
        # experts at a trained network's scale: pre-BN activations of order 1
        fan_in = c_in * 27 * num_experts / 2
        self.weight = nn.Parameter(torch.randn(num_experts, c_out, c_in, 3, 3, 3) / fan_in**0.5)
        self.bias = nn.Parameter(torch.randn(c_out) * 0.1)
        self._routing_fn = _Routing(num_experts)

    def forward(self, x, loc):
        outputs = []
        for b in range(x.shape[0]):
            r = torch.sigmoid(self._routing_fn.fc(loc[b]))
            kernel = (r[:, None, None, None, None, None] * self.weight).sum(0)
            outputs.append(F.conv3d(x[b:b + 1], kernel, self.bias, self.stride, 1))
        return torch.cat(outputs)


class ReferenceBlock(nn.Module):
    def __init__(self, c_in, c_out, num_experts):
        super().__init__()
        self.conv1 = ReferenceCondConv(c_in, c_out, 1, num_experts)
        self.conv2 = ReferenceCondConv(c_out, c_out, 1, num_experts)
        self.conv3 = ReferenceCondConv(c_out, c_out, 2, num_experts)
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm3d(c_out) for _ in range(3))

    def forward(self, x, loc):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.elu(bn(conv(x, loc)))
        return x


class ReferenceEncoder(nn.Module):
    def __init__(self, rep_dim, moco_dim, num_experts):
        super().__init__()
        self.conv1, self.bn1 = ReferenceCondConv(1, 8, 1, num_experts), nn.BatchNorm3d(8)
        self.conv2, self.bn2 = ReferenceCondConv(8, 8, 2, num_experts), nn.BatchNorm3d(8)
        self.downsample1 = ReferenceBlock(8, 16, num_experts)
        self.downsample2 = ReferenceBlock(16, 32, num_experts)
        self.downsample3 = ReferenceBlock(32, 64, num_experts)
        self.conv3, self.bn3 = ReferenceCondConv(64, 128, 1, num_experts), nn.BatchNorm3d(128)
        self.conv4 = ReferenceCondConv(128, rep_dim, 2, num_experts)
        self.bn4 = nn.BatchNorm3d(rep_dim)
        self.fc = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.ReLU(),
                                nn.Linear(rep_dim, moco_dim))

    def forward(self, x, loc):
        x = F.elu(self.bn1(self.conv1(x, loc)))
        x = F.elu(self.bn2(self.conv2(x, loc)))
        x = self.downsample3(self.downsample2(self.downsample1(x, loc), loc), loc)
        x = F.elu(self.bn3(self.conv3(x, loc)))
        h = torch.flatten(F.elu(self.bn4(self.conv4(x, loc))), 1)
        return self.fc(h), h


class ReferenceMoCo(nn.Module):
    def __init__(self, rep_dim, moco_dim, num_experts, queue_size=4, num_landmarks=3):
        super().__init__()
        self.encoder_q = ReferenceEncoder(rep_dim, moco_dim, num_experts)
        self.encoder_k = ReferenceEncoder(rep_dim, moco_dim, num_experts)
        self.register_buffer("queue", torch.randn(moco_dim, queue_size, num_landmarks))
        self.register_buffer("queue_ptr", torch.zeros(num_landmarks, dtype=torch.long))


def reference_checkpoint(tmp_path, rep_dim=24, moco_dim=12, num_experts=3):
    """A reference model with random weights and non-trivial BN statistics, saved in the
    authors' layout; returns (path, its query encoder in eval mode)."""
    torch.manual_seed(0)
    model = ReferenceMoCo(rep_dim, moco_dim, num_experts)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {
        "epoch": 12,
        "arch": "DrasCLR",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    path = tmp_path / "checkpoint_0012.pth.tar"
    torch.save(checkpoint, path)
    return path, model.encoder_q.eval()


def test_reference_checkpoint_gives_the_authors_h(tmp_path):
    path, reference = reference_checkpoint(tmp_path)
    encoder = load_encoder(path)
    assert not encoder.training
    assert encoder.config == dict(rep_dim=24, moco_dim=12, num_experts=3,
                                  conditioning="loc_condconv", backend="auto", patch_axes="zyx")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 32, 32, 32, generator=generator)  # drasclr's (x, y, z) patches
    loc = torch.rand(3, 3, generator=generator) * 2 - 1
    with torch.no_grad():
        # the authors' patches of the same voxels are SimpleITK arrays: (z, y, x)
        z_reference, h_reference = reference(x.permute(0, 1, 4, 3, 2), loc)
        h = encoder(x, loc)
        z = encoder.head(h)
    assert h_reference.std(0).max() > 1e-2  # samples differ by 1000x the tolerance
    torch.testing.assert_close(h, h_reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, z_reference, rtol=1e-5, atol=1e-5)


def test_conversion_keeps_only_the_query_encoder():
    state_dict = ReferenceMoCo(8, 4, 2).state_dict()
    converted = reference_state_dict_to_encoder({f"module.{k}": v for k, v in state_dict.items()})
    assert set(converted) == set(Encoder(rep_dim=8, moco_dim=4, num_experts=2).state_dict())
    assert converted["conv4.routing.weight"] is state_dict["encoder_q.conv4._routing_fn.fc.weight"]
    assert converted["head.2.bias"] is state_dict["encoder_q.fc.2.bias"]
    # A model saved without the DDP wrapper converts the same way.
    assert set(reference_state_dict_to_encoder(state_dict)) == set(converted)


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(2)
    encoder = Encoder(rep_dim=16, moco_dim=8, num_experts=2)
    encoder(torch.randn(2, 1, 32, 32, 32), torch.rand(2, 3))  # move the BN statistics
    path = tmp_path / "encoder.pt"
    torch.save({"config": encoder.config, "state_dict": encoder.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    restored = Encoder(**saved["config"])
    restored.load_state_dict(saved["state_dict"])
    x, loc = torch.randn(2, 1, 32, 32, 32), torch.rand(2, 3)
    encoder.eval(), restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x, loc), encoder(x, loc), rtol=0, atol=0)


def test_not_a_reference_checkpoint_is_named(tmp_path):
    missing_file = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match="absent.pth: no such checkpoint file"):
        load_encoder(missing_file)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth: not a readable torch checkpoint"):
        load_encoder(garbage)

    bare = tmp_path / "bare.pt"  # a state dict alone: neither kind of checkpoint
    torch.save(Encoder(rep_dim=8, moco_dim=4, num_experts=2).state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"bare.pt: not a drasclr training checkpoint, "
                                              r"encoder file or authors' checkpoint"):
        load_encoder(bare)

    state_dict = {f"module.{k}": v for k, v in ReferenceMoCo(8, 4, 2).state_dict().items()}
    del state_dict["module.encoder_q.downsample2.conv1._routing_fn.fc.bias"]
    truncated = tmp_path / "truncated.pth"
    torch.save({"state_dict": state_dict}, truncated)
    with pytest.raises(CheckpointError, match=r"truncated.pth: .*missing keys "
                                         r"\['downsample2.conv1.routing.bias'\]"):
        load_encoder(truncated)

    no_encoder = tmp_path / "no_encoder.pth"
    torch.save({"state_dict": {"module.queue": torch.zeros(2)}}, no_encoder)
    with pytest.raises(CheckpointError, match="no_encoder.pth: .*no query-encoder keys"):
        load_encoder(no_encoder)
