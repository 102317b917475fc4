"""TrainConfig: YAML/JSON round trip, every bad-config error (its flags: test_cli.py)."""
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


def test_ints_are_accepted_for_floats():
    assert isinstance(TrainConfig().replace(lr=1).lr, float)


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
    ({"k_neighbours": -1}, "k_neighbours"),
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


NUMERIC_FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.metadata["valid"] is not None]


@pytest.mark.parametrize("field", NUMERIC_FIELDS, ids=lambda f: f.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1, 0, "1", True, [1]],
                         ids=["nan", "inf", "-inf", "negative", "zero", "text", "bool", "list"])
def test_every_numeric_field_is_checked_for_meaning(field, bad):
    """NaN, infinities, out-of-range and wrong-type values are refused before any work,
    naming the field (a NaN lr once passed `lr <= 0` and trained into a NaN checkpoint)."""
    valid = field.metadata["valid"]
    good = TrainConfig(store="s", atlas="a")
    if not isinstance(bad, (list, str, bool)) and bad == bad and bad in valid:
        pytest.skip(f"{bad!r} is valid for {field.name} ({valid})")
    with pytest.raises(ValueError, match=rf"^(overrides: )?{field.name}[: ]"):
        good.replace(**{field.name: bad}).validate()
    # the same value given directly to the dataclass (no coercion) is caught by validate
    with pytest.raises(ValueError, match=rf"^{field.name}: "):
        dataclasses.replace(good, **{field.name: bad}).validate()


def test_ranges_admit_their_defaults_and_bounds():
    config = TrainConfig(store="s", atlas="a")
    assert config.validate() is config
    config.replace(momentum=0.0, sgd_momentum=0.0, k_neighbours=0, warmup_steps=0, seed=0,
                   weight_decay=0.0, beta=0.0).validate()
    with pytest.raises(ValueError, match=r"momentum: expected a finite number in \[0, 1\), got 1.0"):
        config.replace(momentum=1.0).validate()
    with pytest.raises(ValueError, match="conditioning: expected one of"):
        config.replace(conditioning="film").validate()
