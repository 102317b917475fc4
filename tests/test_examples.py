"""The scripts of examples/ (examples/README.md), each run through its ``main(argv)`` on tiny
settings and checked for what it claims to do."""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"


def load_example(name: str):
    """An example script as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_readme_lists_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    scripts = [p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*")
               if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts]
    assert scripts and [s for s in scripts if s not in readme] == []


# -- (a) LocCondConv3d inside a MONAI network -------------------------------------------------

def test_monai_network_with_loc_cond_conv_learns_a_location_dependent_task(one_thread):
    from drasclr.nn import LocCondConv3d

    example = load_example("monai_loc_cond_conv")
    result = example.main(["--steps", "60", "--batch-size", "32", "--seed", "0"])
    model, losses = result["model"], result["losses"]
    assert not any(isinstance(m, nn.Conv3d) for m in model.modules())
    assert sum(isinstance(m, LocCondConv3d) for m in model.modules()) == model.num_replaced == 6
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert result["accuracy"] > 0.75

    # the coordinate reaches the layers: the same patches at other coordinates score otherwise
    x = torch.randn(4, 1, 16, 16, 16)
    with torch.no_grad():
        here, there = model(x, torch.full((4, 3), -0.5)), model(x, torch.full((4, 3), 0.5))
    assert (here - there).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="model\\(x, loc\\)"):
        model.network(x)

    # the unmodified network cannot see the location and stays near chance
    plain = example.main(["--steps", "30", "--batch-size", "32", "--seed", "0", "--no-location"])
    assert plain["accuracy"] < 0.65


# -- (b) pretraining on a folder of scans, atlas included; shared by (c) -----------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The pretraining example on 3 small synthetic subjects, its atlas made from one scan."""
    from drasclr.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("own_scans")
    cohort = generate_cohort(root / "cohort", 3, seed=0, size="small", workers=1, progress=False,
                             version=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = load_example("pretrain_own_scans").main([
            "--scans", str(cohort / "images"), "--atlas-scan", str(cohort / "images" / "sub0001.nii.gz"),
            "--out", str(root / "run"), "--max-steps", "3", "--batch-size", "8",
            "--landmarks-per-batch", "2", "--queue-size", "16", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    return cohort, result


def test_pretraining_on_own_scans_runs_end_to_end(pretrained):
    from drasclr.data.atlas import Atlas, build_atlas
    from drasclr.data.store import PatchStore

    cohort, result = pretrained
    atlas = Atlas.load(result["atlas"])
    template = build_atlas(cohort / "template" / "lung_mask.nii.gz")
    # one subject's segmented lungs give about as many landmarks as the template's lungs
    assert 0.5 * template.num_landmarks <= atlas.num_landmarks <= 2 * template.num_landmarks
    store = PatchStore(result["store"])
    assert store.num_subjects == 3 and store.num_landmarks == atlas.num_landmarks
    assert [row["step"] for row in result["history"]] == [1, 2, 3]
    assert result["checkpoint"].is_file()
    features = result["features"]
    assert features.subject_ids == sorted(p.name.split(".")[0] for p in (cohort / "images").iterdir())
    assert features.features.shape == (3, 128) and np.isfinite(features.features).all()
    assert np.abs(features.features[0] - features.features[1]).max() > 1e-4


def test_example_refuses_a_missing_scan_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_example("pretrain_own_scans").main([
            "--scans", str(tmp_path / "nowhere"), "--atlas-mask", "m.nii.gz", "--out", str(tmp_path)])
    assert "nowhere: no such folder" in capsys.readouterr().err


# -- (c) the authors' checkpoint -> features ---------------------------------------------------

def test_authors_checkpoint_gives_the_features_of_its_weights(pretrained, tmp_path, one_thread):
    from drasclr.data.atlas import Atlas
    from drasclr.intensity import normalise_hu
    from drasclr.nn import Encoder
    from helpers import authors_layout  # docs/method.md#the-authors-checkpoints

    _, result = pretrained
    torch.manual_seed(3)
    encoder = Encoder(num_experts=2)
    with torch.no_grad():  # BatchNorm statistics away from their initial values
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    checkpoint = tmp_path / "checkpoint_0019.pth.tar"
    torch.save(authors_layout(encoder), checkpoint)  # as the authors' training script saves it

    features = load_example("authors_checkpoint_features").main([
        "--checkpoint", str(checkpoint), "--store", str(result["store"]),
        "--out", str(tmp_path / "authors.npz"), "--device", "cpu"])

    # float64 reference for the first subject: every landmark's patch, one at a time
    atlas = Atlas.load(result["atlas"])
    patches = np.load(Path(result["store"]) / "patches" / f"{features.subject_ids[0]}.npy")
    reference = encoder.double().eval()
    reference.backend = "loop"
    with torch.no_grad():
        h = reference(normalise_hu(torch.from_numpy(patches)).double()[:, None],
                      torch.from_numpy(atlas.coords).double())
    expected = h.mean(0).numpy()
    np.testing.assert_allclose(features.features[0], expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
    assert features.metadata["name"] == "DrasCLR (authors)"


# -- (d) survival from exported features -------------------------------------------------------

def planted_survival(folder: Path, n: int = 150, seed: int = 0) -> tuple[Path, Path]:
    """Features whose leading latent factor sets the hazard; confounders without effect."""
    from drasclr.features import FeatureSet

    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3)) * 3
    features = latent @ rng.normal(size=(3, 32)) + rng.normal(size=(n, 32)) * 0.5
    ids = [f"sub{i:04d}" for i in range(n)]
    event_time = rng.exponential(1 / (0.1 * np.exp(0.5 * latent[:, 0])))
    censor_time = rng.uniform(0, 30, n)
    FeatureSet(ids, features, {"name": "planted"}).save(folder / "features.npz")
    pd.DataFrame({
        "subject_id": ids, "survival_time": np.minimum(event_time, censor_time),
        "death": (event_time <= censor_time).astype(int), "age": rng.uniform(40, 80, n),
        "sex": rng.integers(0, 2, n), "race": rng.integers(0, 2, n),
        "smoking_status": rng.integers(0, 3, n), "pack_years": rng.uniform(0, 80, n),
    }).sample(frac=1, random_state=seed).to_csv(folder / "clinical.csv", index=False)
    return folder / "features.npz", folder / "clinical.csv"


def test_survival_example_finds_the_planted_risk(tmp_path):
    features, clinical = planted_survival(tmp_path)
    result = load_example("survival_lifelines").main(
        ["--features", str(features), "--clinical", str(clinical)])
    image = result["cindex"]["confounders + image"].mean()
    confounders = result["cindex"]["confounders"].mean()
    assert image > 0.75 and confounders < 0.62
    hazard_ratio = result["model"].summary["exp(coef)"]
    assert max(abs(np.log(hazard_ratio[c])) for c in ("age", "sex", "race")) < 0.4


def test_survival_example_names_the_missing_column(tmp_path):
    features, clinical = planted_survival(tmp_path, n=20)
    pd.read_csv(clinical).drop(columns="pack_years").to_csv(clinical, index=False)
    with pytest.raises(ValueError, match=r"clinical.csv: missing column\(s\) \['pack_years'\]"):
        load_example("survival_lifelines").main(
            ["--features", str(features), "--clinical", str(clinical)])


# -- (e) multi-GPU / multi-node launch ---------------------------------------------------------

def test_multi_gpu_config_is_valid_for_two_nodes_of_four():
    from drasclr.pretrain import TrainConfig

    config = TrainConfig.load(EXAMPLES / "multi_gpu" / "pretrain.yaml")
    config.validate(world_size=8)
    assert (config.batch_size, config.queue_size, config.device) == (128, 4096, "cuda")


def test_launch_script_builds_the_torchrun_command():
    from torch.distributed.run import get_args_parser

    script = EXAMPLES / "multi_gpu" / "launch.sh"
    env = {**os.environ, "DRY_RUN": "1", "NNODES": "2", "NODE_RANK": "1",
           "MASTER_ADDR": "node0.example.org", "MASTER_PORT": "29555"}
    printed = subprocess.run(["bash", str(script), "--set", "lr=0.02"], env=env, check=True,
                             capture_output=True, text=True).stdout
    command = shlex.split(printed)
    assert command[0] == "torchrun"
    args = get_args_parser().parse_args(command[1:])  # torchrun's own parser
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == (
        "2", 1, "node0.example.org", 29555)
    assert args.nproc_per_node == "4" and args.module and args.training_script == "drasclr.cli"
    assert args.training_script_args == [
        "train", "--config", str(EXAMPLES / "multi_gpu" / "pretrain.yaml"), "--set", "lr=0.02"]


# -- the ablation config matches the demo's output layout --------------------------------------

def test_ablation_config_points_into_the_demo_output():
    from drasclr.evaluation.ablation import AblationConfig

    config = AblationConfig.load(EXAMPLES / "ablation.yaml")
    demo = REPO_ROOT / "demo_output"  # `make demo` = `drasclr demo --out demo_output`
    # drasclr.demo writes <out>/atlas.npz and <out>/copd/{cohort,store}
    resolved = {key: Path(os.path.normpath(getattr(config, key)))
                for key in ("store", "atlas", "clinical", "annotations")}
    assert resolved == {"store": demo / "copd" / "store", "atlas": demo / "atlas.npz",
                        "clinical": demo / "copd" / "cohort" / "clinical.csv",
                        "annotations": demo / "copd" / "cohort" / "annotations.csv"}


# -- (f) a real chest CT as one HTML figure ------------------------------------------------------

def test_real_ct_figure_draws_the_segmentation_landmarks_and_a_dense_map(real_store, tmp_path,
                                                                         one_thread):
    from real_data import LUNG1, REAL, SCANS

    store, atlas = real_store
    example = load_example("real_ct_figure")
    result = example.main(["--scan", str(REAL / SCANS[LUNG1]), "--store", str(store),
                           "--out", str(tmp_path), "--step", "8", "--synthetic-subjects", "5"])
    html = result["html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "synthetic cohort" in html
    # the slice through the most lung: a lung cross-section of an adult, mapped everywhere
    lung, probability = result["lung"], result["probability"]
    assert lung.sum() > 10_000
    assert ((probability > 0) & (probability < 1))[lung].mean() > 0.99
    assert (probability[~lung] == 0).all() and probability[lung].std() > 0
    # landmarks within half a step of the slice: about one layer of the landmark grid
    assert 10 < result["landmarks_drawn"] < atlas.num_landmarks / 3
