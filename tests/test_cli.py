"""The command-line layer: one line per failure, exit codes, --debug, --version, python -m."""
import dataclasses
import errno
import subprocess
import sys
import types
import typing

import pytest

from drasclr import __version__
from drasclr import cli
from drasclr.pretrain.config import TrainConfig


def fail_with(error):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize("error,code,expected", [
    (ValueError("store: bad\nthing"), 2, "drasclr atlas: error: store: bad thing"),
    (FileNotFoundError(errno.ENOENT, "No such file", "/data/x.nii"), 2,
     "drasclr atlas: error: [Errno 2] No such file: '/data/x.nii'"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/checkpoint_last.pt"), 1,
     "drasclr atlas: error: [Errno 28] No space left on device: '/runs/checkpoint_last.pt' "
     "(run with --debug for the traceback)"),
    (RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"), 1,
     "drasclr atlas: error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB "
     "(run with --debug for the traceback)"),
])
def test_every_failure_is_one_line_with_its_exit_code(monkeypatch, capsys, error, code, expected):
    from drasclr.cli import atlas

    monkeypatch.setattr(atlas, "run", fail_with(error))
    assert cli.main(["atlas", "--mask", "m.nii.gz", "--out", "a.npz"]) == code
    err = capsys.readouterr().err
    assert err == expected + "\n"
    monkeypatch.setattr(atlas, "run", fail_with(error))
    with pytest.raises(type(error)):
        cli.main(["--debug", "atlas", "--mask", "m.nii.gz", "--out", "a.npz"])


def test_version_and_python_m(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"drasclr {__version__}"
    result = subprocess.run([sys.executable, "-m", "drasclr", "--help"], capture_output=True,
                            text=True, check=True)
    assert "evaluate" in result.stdout and "--debug" in result.stdout


# -- drasclr train: flags generated from TrainConfig ------------------------------------------
def _config_fields(cls, prefix=""):
    """(dotted name, field) of every leaf field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _config_fields(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def test_every_train_config_field_is_a_flag_with_help():
    parser = cli.build_parser("train")
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    actions = train_parser._option_string_actions
    names = list(_config_fields(TrainConfig))
    assert len(names) > 30
    for name, f in names:
        flag = "--" + name.replace("_", "-")
        assert flag in actions, flag
        assert f.metadata["help"] in actions[flag].help, flag


@pytest.fixture
def trained_with(monkeypatch):
    """Run `drasclr train ARGS` with training replaced by capturing its config."""
    import drasclr.pretrain

    seen = []

    def fake_train(config):
        seen.append(config)
        return types.SimpleNamespace(checkpoint="ckpt.pt")

    monkeypatch.setattr(drasclr.pretrain, "train", fake_train)

    def run(*args):
        assert cli.main(["train", *args]) == 0
        return seen[-1]
    return run


def test_flag_values_keep_their_type(trained_with):
    config = trained_with("--out-dir", "2024", "--store", "001", "--atlas", "a.npz", "--lr", "1",
                          "--max-steps", "7", "--no-amp", "--backend", "loop", "--grad-clip", "2.5")
    assert (config.out_dir, config.store) == ("2024", "001")
    assert type(config.lr) is float and config.lr == 1.0
    assert type(config.max_steps) is int and config.max_steps == 7
    assert (config.amp, config.backend, config.grad_clip) == (False, "loop", 2.5)
    assert trained_with("--max-steps", "none", "--tensorboard").max_steps is None


def test_config_file_then_flags_override_it(trained_with, tmp_path):
    path = TrainConfig(store="s", atlas="a.npz", lr=0.05, epochs=3, amp=False).save(tmp_path / "run.yaml")
    config = trained_with("--config", str(path), "--lr", "0.2", "--amp")
    assert (config.store, config.atlas, config.epochs) == ("s", "a.npz", 3)  # from the file
    assert (config.lr, config.amp) == (0.2, True)  # the flags win
    assert config.momentum == TrainConfig().momentum  # neither: the default


@pytest.mark.parametrize("args,expected", [
    (["--backend", "cuda"], "argument --backend: invalid choice: 'cuda'"),
    (["--conditioning", "film"], "argument --conditioning: invalid choice: 'film'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviation of --epochs
    (["--set", "lr=0.1"], "unrecognized arguments: --set lr=0.1"),  # the old mechanism is gone
])
def test_bad_flag_exits_2_with_one_line(capsys, args, expected):
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("drasclr") and f"error: {expected}" in err


@pytest.mark.parametrize("command", ["train", "demo"])
def test_unknown_flag_names_the_command(capsys, command):
    assert cli.main([command, "--no-such-flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"drasclr {command}: error: unrecognized arguments: --no-such-flag 1\n"


@pytest.mark.parametrize("command,flag,value", [
    ("synth", "--kind", "asthma"), ("synth", "--size", "huge"),
    ("preprocess", "--segmentation", "unet"), ("preprocess", "--schedule", "slow"),
])
def test_enumerations_are_choices(capsys, command, flag, value):
    assert cli.main([command, flag, value]) == 2
    assert f"argument {flag}: invalid choice" in capsys.readouterr().err


def test_help_speaks_to_users(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for step in ("drasclr atlas", "drasclr preprocess", "drasclr train", "drasclr features",
                 "drasclr evaluate", "drasclr demo"):
        assert step in out


def test_demo_flags_become_demo_settings(monkeypatch, tmp_path):
    from pathlib import Path

    from drasclr.cli import demo
    from drasclr.demo import DemoSettings

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: seen.append(settings) or Path("r"))
    assert cli.main(["demo", "--out", str(tmp_path), "--quick", "--seed", "3", "--covid-subjects", "0"]) == 0
    assert seen == [DemoSettings(out=tmp_path, quick=True, seed=3, covid_subjects=0)]
    assert cli.main(["demo", "--out", str(tmp_path), "--full", "--seeds", "4", "--repeats", "2"]) == 0
    assert seen[-1] == DemoSettings(out=tmp_path, full=True, seeds=4, repeats=2)
    assert cli.main(["demo", "--full", "--quick"]) == 2


def test_demo_plans_and_their_overrides():
    from drasclr.demo import DEMO, FULL, PATCH_STAGES, DemoSettings, resolve_plan

    plan = resolve_plan(DemoSettings())
    assert plan == DEMO and plan.seeds >= 3 and plan.patch_stages == ("detection_probes",)
    full = resolve_plan(DemoSettings(full=True, covid_subjects=0, repeats=2))
    assert full.patch_stages == PATCH_STAGES[1:] and full.seeds >= 3
    assert (full.covid.subjects, full.repeats, full.copd) == (0, 2, FULL.copd)
    for settings, message in ((DemoSettings(full=True, quick=True), "choose one"),
                              (DemoSettings(seeds=0), "--seeds: expected a positive integer"),
                              (DemoSettings(subjects=9), "need at least 10 for 5-fold")):
        with pytest.raises(ValueError, match=message):
            resolve_plan(settings)


def test_nested_augment_flags(trained_with):
    config = trained_with("--augment.noise-std", "20", "--augment.contrast-gamma", "1", "2",
                          "--no-augment.enabled")
    assert (config.augment.noise_std, config.augment.contrast_gamma) == (20.0, (1.0, 2.0))
    assert config.augment.enabled is False and config.augment.rotate_degrees == 10.0


def test_resumed_demo_keeps_a_stage_only_while_its_inputs_settings_and_figures_stand(tmp_path):
    """A stage's kept sections are reused by a re-run, and recomputed once an input file
    changed after them, the settings differ or one of their figures is gone."""
    import os
    from pathlib import Path

    import numpy as np

    from drasclr.demo import _kept_sections
    from drasclr.evaluation.report import Figure, Section, Table

    rng = np.random.default_rng()
    report_dir, kept = tmp_path / "report", tmp_path / "sections" / "evaluate.json"
    checkpoint = tmp_path / "checkpoint_last.pt"
    checkpoint.write_bytes(rng.bytes(64))
    (report_dir / "figs").mkdir(parents=True)
    calls = []

    def compute():
        calls.append(float(rng.normal()))
        (report_dir / "figs" / "curve.png").write_bytes(rng.bytes(16))
        return [Section("readout", tables=[Table("R2", ["score"], [[calls[-1]]])],
                        figures=[Figure("curve", Path("figs/curve.png"))])]

    def run(settings):
        sections = _kept_sections(kept, compute, inputs=[checkpoint], settings=settings,
                                  report_dir=report_dir)
        return sections[0].tables[0].rows[0][0]

    settings = {"folds": 5, "patch_level": {"fractions": (0.1, 1.0)}}
    first = run(settings)
    assert run(settings) == first and len(calls) == 1  # kept, tuples and all

    earlier = checkpoint.stat().st_mtime_ns - 1_000_000_000
    os.utime(kept, ns=(earlier, earlier))  # training resumed and rewrote the checkpoint since
    assert run(settings) == calls[-1] != first and len(calls) == 2
    assert run(settings) == calls[-1] and len(calls) == 2

    assert run({**settings, "folds": 3}) == calls[-1] and len(calls) == 3
    (report_dir / "figs" / "curve.png").unlink()
    run({**settings, "folds": 3})
    assert len(calls) == 4 and (report_dir / "figs" / "curve.png").exists()


def test_demo_leaves_out_the_boxes_of_subjects_that_failed_preprocessing(tmp_path):
    """A subject that failed preprocessing has no patches: the demo's patch-level stages go on
    with the other subjects' boxes instead of stopping."""
    import csv

    import numpy as np

    from drasclr.data.store import write_subject
    from drasclr.demo import _annotations_in_store
    from helpers import make_store

    store, _ = make_store(tmp_path, num_subjects=3, num_landmarks=2)
    write_subject(store, "s01", "synthetic", error="registration failed: lung Dice 0.7")
    annotations = tmp_path / "annotations.csv"
    rows = [{"subject_id": s, "label": label, "x_mm": str(i)} for i, (s, label) in enumerate(
        [("s00", "healthy"), ("s01", "centrilobular"), ("s02", "paraseptal"), ("s01", "healthy")])]
    with open(annotations, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["subject_id", "label", "x_mm"])
        writer.writeheader()
        writer.writerows(rows)

    kept_path = _annotations_in_store(annotations, store, tmp_path)
    with open(kept_path, newline="") as file:
        kept = list(csv.DictReader(file))
    assert [row["subject_id"] for row in kept] == ["s00", "s02"]
    assert kept == [rows[0], rows[2]]  # every column of the kept rows unchanged
    redone = np.random.default_rng(1).integers(-1000, 200, (2, 32, 32, 32), dtype=np.int16)
    write_subject(store, "s01", "synthetic", patches=redone)
    assert _annotations_in_store(annotations, store, tmp_path / "other") == annotations
