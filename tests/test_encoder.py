"""Encoder (Yu et al. 2023, Section 3): shapes, backends, conditioning variants, config, errors."""
import pytest
import torch

from drasclr.conv_common import as_partition
from drasclr.nn import CONDITIONINGS, Encoder, LocCondConv3d, loc_cond_conv

SMALL = dict(rep_dim=16, moco_dim=8, num_experts=2)  # full depth and 32^3 input, few channels


def patches_at_landmarks(counts, seed=0):
    """Patches (B, 1, 32^3) and coordinates (B, 3), ``counts[g]`` samples of landmark g,
    shuffled."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.rand(len(counts), 3, generator=generator) * 2 - 1
    landmark = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    landmark = landmark[torch.randperm(len(landmark), generator=generator)]
    x = torch.randn(len(landmark), 1, 32, 32, 32, generator=generator)
    return x, coords[landmark]


def test_default_encoder_layers_and_shapes():
    encoder = Encoder()
    shapes = {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    assert shapes["conv1.weight"] == (8, 8, 1, 3, 3, 3)
    assert shapes["downsample2.conv3.weight"] == (8, 32, 32, 3, 3, 3)
    assert shapes["downsample3.bn3.running_var"] == (64,)
    assert shapes["conv4.routing.weight"] == (8, 3)
    assert shapes["conv4.weight"] == (8, 128, 128, 3, 3, 3)
    assert shapes["head.0.weight"] == (128, 128) and shapes["head.2.weight"] == (128, 128)
    convs = [m for m in encoder.modules() if isinstance(m, LocCondConv3d)]
    assert len(convs) == 13  # conv1, conv2, 3 blocks x 3, conv3, conv4
    x, loc = patches_at_landmarks([1, 1])
    encoder.eval()
    with torch.no_grad():
        h = encoder(x, loc)
        assert h.shape == (2, 128) and encoder.head(h).shape == (2, 128)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_every_conditioning_trains_one_step(conditioning):
    torch.manual_seed(0)
    encoder = Encoder(conditioning=conditioning, **SMALL)
    x, loc = patches_at_landmarks([2, 1, 3])
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    h = encoder(x, loc)
    z = encoder.head(h)
    assert h.shape == (6, 16) and z.shape == (6, 8)
    loss = (z - torch.arange(8.0)).pow(2).mean()
    loss.backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    optimizer.step()
    changed = {name for name, p in encoder.named_parameters() if not torch.equal(p, before[name])}
    assert changed == set(before)
    assert (encoder.head(encoder(x, loc)) - torch.arange(8.0)).pow(2).mean() < loss


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_location_matters_unless_unconditioned(conditioning):
    torch.manual_seed(1)
    encoder = Encoder(conditioning=conditioning, **SMALL).eval()
    x, loc = patches_at_landmarks([1, 1])
    with torch.no_grad():
        h, h_moved = encoder(x, loc), encoder(x, loc + 0.5)
    assert torch.equal(h, h_moved) == (conditioning == "none")


@pytest.mark.parametrize("conditioning", ["loc_condconv", "hypernetwork"])
def test_grouped_matches_per_sample_in_mixed_batches(conditioning):
    """Interleaving the batch once per forward must not change any sample's h: each sample,
    encoded alone (eval mode: no batch statistics), gives the same h as in the mixed batch."""
    torch.manual_seed(2)
    encoder = Encoder(conditioning=conditioning, **SMALL)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    encoder.eval()
    x, loc = patches_at_landmarks([1, 3, 2, 2], seed=3)
    with torch.no_grad():
        h = encoder(x, loc)
        alone = torch.cat([encoder(x[b:b + 1], loc[b]) for b in range(x.shape[0])])
    torch.testing.assert_close(h, alone, rtol=1e-4, atol=1e-5)


def test_loop_and_grouped_backends_agree_in_training():
    torch.manual_seed(3)
    encoder = Encoder(**SMALL, backend="loop")
    x, loc = patches_at_landmarks([3, 1, 2], seed=4)
    h_loop = encoder(x, loc)
    grad_loop = torch.autograd.grad(h_loop.square().sum(), encoder.conv2.routing.weight)[0]
    encoder.backend = "grouped"  # sets every layer's, not only the saved config
    assert encoder.backend == encoder.config["backend"] == "grouped"
    layers = [m for m in encoder.modules() if isinstance(m, LocCondConv3d)]
    assert len(layers) == 13 and all(m.backend == "grouped" for m in layers)
    h_grouped = encoder(x, as_partition(loc, x.shape[0]))
    grad_grouped = torch.autograd.grad(h_grouped.square().sum(), encoder.conv2.routing.weight)[0]
    torch.testing.assert_close(h_grouped, h_loop, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_grouped, grad_loop, rtol=1e-3, atol=1e-5)


def test_setting_the_backend_changes_what_every_layer_runs(monkeypatch):
    calls = []
    original = loc_cond_conv._loop
    monkeypatch.setattr(loc_cond_conv, "_loop", lambda *a: calls.append(1) or original(*a))
    encoder = Encoder(**SMALL, backend="grouped")
    x, loc = patches_at_landmarks([2, 1], seed=5)
    encoder(x, loc)
    assert calls == []
    encoder.backend = "loop"
    encoder(x, loc)
    assert len(calls) == 13  # one call per Loc-CondConv layer
    encoder.backend = "grouped"
    encoder(x, loc)
    assert len(calls) == 13


def test_config_rebuilds_the_encoder():
    torch.manual_seed(4)
    encoder = Encoder(conditioning="concat", **SMALL)
    encoder.backend = "loop"
    assert encoder.config == dict(SMALL, conditioning="concat", backend="loop", patch_axes="xyz")
    rebuilt = Encoder(**encoder.config)
    rebuilt.load_state_dict(encoder.state_dict())
    x, loc = patches_at_landmarks([2])
    encoder.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, loc), encoder(x, loc), rtol=0, atol=0)


@pytest.mark.parametrize("make_call, message", [
    (lambda: Encoder(conditioning="film"), "conditioning: expected one of"),
    (lambda: Encoder(rep_dim=0), "rep_dim"),
    (lambda: Encoder(backend="gpu"), "backend"),
    (lambda: setattr(Encoder(**SMALL), "backend", "fastest"), "backend"),
    (lambda: Encoder(**SMALL)(torch.randn(2, 1, 16, 16, 16), torch.rand(2, 3)), r"x: expected"),
    (lambda: Encoder(**SMALL)(torch.randn(2, 32, 32, 32), torch.rand(2, 3)), r"x: expected"),
    (lambda: Encoder(**SMALL)(torch.randn(2, 1, 32, 32, 32), torch.rand(3, 3)), "loc"),
    (lambda: Encoder(conditioning="none", **SMALL)(torch.randn(2, 1, 32, 32, 32),
                                                   torch.full((2, 3), float("inf"))), "finite"),
])
def test_bad_input_names_argument(make_call, message):
    with pytest.raises(ValueError, match=message):
        make_call()
