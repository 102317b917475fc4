"""TrainConfig: YAML/JSON round trip, --set parsing, every bad-config error."""
import dataclasses

import pytest

from drasclr.pretrain.config import TrainConfig


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    config = TrainConfig(store="s", atlas="a.npz", max_steps=7, lr=0.05, grad_clip=1.5, augment=False)
    path = config.save(tmp_path / f"run{suffix}")
    assert TrainConfig.load(path) == config


def test_every_field_documented():
    for f in dataclasses.fields(TrainConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name


def test_assignments_parse_yaml_scalars():
    config = TrainConfig().with_assignments(["lr=0.5", "max_steps=3", "grad_clip=null", "augment=false",
                                             "store=/data/x"])
    assert (config.lr, config.max_steps, config.grad_clip, config.augment, config.store) == (0.5, 3, None, False, "/data/x")
    assert TrainConfig().with_assignments(["lr=1"]).lr == 1.0 and isinstance(TrainConfig().replace(lr=1).lr, float)


@pytest.mark.parametrize("change,message", [
    ({"store": None}, "store"),
    ({"atlas": ""}, "atlas"),
    ({"batch_size": 100, "landmarks_per_batch": 16}, "not divisible by landmarks_per_batch"),
    ({"queue_size": 4}, "queue_size"),
    ({"temperature": 0.0}, "temperature"),
    ({"momentum": 1.0}, "momentum"),
    ({"epochs": 0}, "epochs"),
    ({"max_steps": 0}, "max_steps"),
    ({"bank_dtype": "float16"}, "bank_dtype"),
    ({"neighbour_loss": "max"}, "neighbour_loss"),
    ({"backend": "cuda"}, "backend"),
    ({"k_neighbors": -1}, "k_neighbors"),
])
def test_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(store="s", atlas="a").replace(**change).validate()


def test_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="3 processes"):
        TrainConfig(store="s", atlas="a", batch_size=16, landmarks_per_batch=4).validate(world_size=3)


def test_unknown_keys_and_types(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        TrainConfig().replace(learning_rate=0.1)
    with pytest.raises(ValueError, match="batch_size must be int"):
        TrainConfig().replace(batch_size="big")
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig().with_assignments(["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        TrainConfig.load(bad)
    (tmp_path / "typo.json").write_text('{"epoch": 3}')
    with pytest.raises(ValueError, match="typo.json: unknown key"):
        TrainConfig.load(tmp_path / "typo.json")
    with pytest.raises(ValueError, match="no such file"):
        TrainConfig.load(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=".yaml, .yml or .json"):
        TrainConfig().save(tmp_path / "run.toml")
