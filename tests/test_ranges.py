"""every numeric setting is checked for meaning (finite, in range, of the
right kind) before any work, and the error names the setting. The settings are discovered
(dataclass fields, function parameters), not listed by hand, so a new one is covered too."""
import dataclasses
import inspect
import math
import typing

import numpy as np
import pytest

from drasclr.data.preprocess import preprocess
from drasclr.data.synthetic import generate_cohort
from drasclr.evaluation.ablation import AblationConfig
from drasclr.evaluation.densemap import densemap
from drasclr.evaluation.detection import DetectionConfig
from drasclr.evaluation.detection_models import FineTuneConfig
from drasclr.features import extract_features
from drasclr.pretrain.config import TrainConfig
from drasclr.ranges import Interval, check_number, field_ranges

CONFIGS = {
    TrainConfig: dict(store="s", atlas="a"),
    DetectionConfig: {},
    FineTuneConfig: {},
    AblationConfig: dict(store="s", atlas="a", clinical="c", out="o"),
}
BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -1, "text": "1",
       "bool": True, "none-number": [1]}


def is_numeric(hint) -> bool:
    """int / float / their optional or tuple/list forms."""
    args = typing.get_args(hint)
    return hint in (int, float) or any(is_numeric(a) for a in args if a is not type(None))


def numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if is_numeric(hints[f.name])]


FIELD_CASES = [(cls, name) for cls in CONFIGS for name in numeric_fields(cls)]


def test_every_config_has_numeric_fields_found():
    names = {cls.__name__: numeric_fields(cls) for cls in CONFIGS}
    assert {"lr", "temperature", "batch_size"} <= set(names["TrainConfig"])
    assert {"folds", "cs"} <= set(names["DetectionConfig"])
    assert {"folds", "seed", "neighbours"} <= set(names["AblationConfig"])


def bad_value(hint, value):
    """The bad value in the field's shape: a sequence field gets it as its one item."""
    origin = typing.get_origin(hint)
    return (value,) if origin in (tuple, list) else value


@pytest.mark.parametrize("cls,name", FIELD_CASES, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_field_values_name_the_field(cls, name, kind):
    hint = typing.get_type_hints(cls)[name]
    value = bad_value(hint, BAD[kind])
    with pytest.raises(ValueError, match=rf"^{name}[: ]"):
        cls(**CONFIGS[cls], **{name: value})


@pytest.mark.parametrize("cls,name", FIELD_CASES, ids=lambda x: getattr(x, "__name__", x))
def test_zero_follows_the_declared_range(cls, name):
    """Zero is refused exactly where the declared range excludes it (seeds and counts may be 0;
    a learning rate, temperature or batch may not)."""
    hint = typing.get_type_hints(cls)[name]
    valid = field_ranges(cls).get(name)
    zero = bad_value(hint, 0)
    if valid is None:  # a sequence or a check inside __post_init__: only its outcome is known
        try:
            cls(**CONFIGS[cls], **{name: zero})
        except ValueError as error:
            assert str(error).startswith(f"{name}")
        return
    if 0 in valid:
        assert getattr(cls(**CONFIGS[cls], **{name: zero}), name) == zero
    else:
        with pytest.raises(ValueError, match=rf"^{name}: expected (a finite number|an integer) in "):
            cls(**CONFIGS[cls], **{name: zero})


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_defaults_are_valid(cls):
    config = cls(**CONFIGS[cls])
    for name, valid in field_ranges(cls).items():
        value = getattr(config, name)
        assert value is None or value in valid, name


def test_nan_learning_rate_never_reaches_training(capsys):
    """The reported case: a NaN lr passed `lr <= 0` and trained; a NaN temperature was blamed
    on the learning rate."""
    from drasclr.cli import main

    with pytest.raises(ValueError, match=r"^lr: expected a finite number in \(0, inf\), got nan"):
        TrainConfig(store="s", atlas="a", lr=float("nan"))
    with pytest.raises(ValueError, match=r"^temperature: "):
        TrainConfig(store="s", atlas="a", temperature=float("nan"))
    assert main(["train", "--store", "s", "--atlas", "a", "--lr", "nan"]) == 2
    assert "lr: expected a finite number" in capsys.readouterr().err


def test_interval_bounds_and_kinds():
    half_open = Interval(0, 1, high_open=True)
    assert 0 in half_open and 0.999 in half_open and 1 not in half_open
    assert math.nan not in Interval(-math.inf) and math.inf not in Interval(-math.inf)
    check_number("k", np.int64(3), Interval(1, integer=True))  # numpy integers are integers
    with pytest.raises(ValueError, match=r"^k: expected an integer in \[1, inf\), got 2.0"):
        check_number("k", 2.0, Interval(1, integer=True))
    with pytest.raises(ValueError, match=r"^x: expected a finite number in \[0, 1\), got False"):
        check_number("x", False, half_open)


# -- numeric arguments of the long jobs: every int/float parameter, found by its annotation --

JOBS = {
    preprocess: dict(images="no-images", atlas_path="no-atlas", out="no-store"),
    generate_cohort: dict(out_dir="no-cohort", subjects=1),
    densemap: dict(image="no-image", store="no-store", out="no-map", head_path="no-head"),
    extract_features: dict(source=None, store="no-store", random_init=0),
}


def numeric_parameters(function):
    hints = typing.get_type_hints(function)
    return [name for name in inspect.signature(function).parameters
            if name in hints and is_numeric(hints[name])]


PARAMETER_CASES = [(f, name) for f in JOBS for name in numeric_parameters(f)]


def test_job_parameters_found():
    assert {(f.__name__, n) for f, n in PARAMETER_CASES} >= {
        ("preprocess", "workers"), ("generate_cohort", "subjects"), ("generate_cohort", "seed"),
        ("densemap", "step"), ("densemap", "batch"), ("extract_features", "batch_size")}


@pytest.mark.parametrize("function,name", PARAMETER_CASES,
                         ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("kind", ["nan", "inf", "negative", "text", "bool"])
def test_bad_job_arguments_name_the_argument_before_any_work(tmp_path, monkeypatch, function,
                                                             name, kind):
    monkeypatch.chdir(tmp_path)  # the dummy paths must not exist: the check comes first
    with pytest.raises(ValueError, match=rf"^{name}[: ]"):
        function(**{**JOBS[function], name: BAD[kind]})
    assert not any(tmp_path.iterdir()), "work started before the arguments were checked"
