"""Ablations: each variant is pretrained with exactly its one change, resumes instead of
retraining, and the tables hold one row per variant with the paper's measures."""
import csv

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from drasclr.data.atlas import build_atlas
from drasclr.data.store import create_store, write_subject
from drasclr.evaluation.ablation import AblationConfig, run_ablations
from drasclr.evaluation.report import Score

SUBJECTS = 24


@pytest.fixture(scope="module")
def ablation_inputs(tmp_path_factory):
    """A store of subjects whose tissue density follows their lung function, and their table."""
    root = tmp_path_factory.mktemp("ablation")
    mask = np.zeros((70, 60, 60), np.uint8)
    mask[8:62, 8:40, 10:50] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "mask.nii.gz")
    atlas = build_atlas(root / "mask.nii.gz")
    atlas.save(root / "atlas.npz")
    create_store(root / "store", atlas, root / "atlas.npz")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(SUBJECTS):
        severity = (i % 4) / 3
        patches = rng.normal(-800 - 150 * severity, 100, (atlas.num_landmarks, 32, 32, 32))
        write_subject(root / "store", f"s{i:02d}", f"s{i}.nii.gz", patches.clip(-1024, 240).astype(np.int16),
                      quality={"laa950_percent": 10 * severity, "perc15_hu": -900 - 50 * severity,
                               "mean_lung_density_hu": -800 - 150 * severity,
                               "lung_volume_ml": 3000 + rng.normal(0, 100),
                               "haa_700_300_percent": 1.0})
        rows.append({"subject_id": f"s{i:02d}", "fev1pp": 100 - 50 * severity + rng.normal(0, 5),
                     "fev1_fvc": 0.8 - 0.3 * severity + rng.normal(0, 0.02),
                     "gold": i % 4, "cle_score": i % 4})
    with open(root / "clinical.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_variants_differ_in_one_thing_and_resume(ablation_inputs, tmp_path):
    root = ablation_inputs
    config_path = tmp_path / "ablation.yaml"
    config_path.write_text(yaml.safe_dump({
        "store": str(root / "store"), "atlas": str(root / "atlas.npz"),
        "clinical": str(root / "clinical.csv"), "out": "runs",
        "train": {"max_steps": 2, "batch_size": 8, "landmarks_per_batch": 2, "queue_size": 8,
                  "rep_dim": 16, "moco_dim": 8, "num_experts": 2, "augment": False},
        "conditioning": ["none", "loc_condconv"], "neighbours": [0], "inference_locations": [],
        "folds": 2}))
    config = AblationConfig.load(config_path)
    assert config.out == str(tmp_path / "runs")  # relative to the config file
    sections = run_ablations(config, progress=False)
    assert [s.title.split(":")[0] for s in sections] == ["Conditioning", "Neighbouring contrastive loss"]
    conditioning, neighbours = (s.tables[0] for s in sections)
    assert [row[0] for row in conditioning.rows] == ["no conditioning", "Loc-CondConv (DrasCLR)"]
    assert [row[0] for row in neighbours.rows] == ["no neighbouring contrast"]
    for row in conditioning.rows + neighbours.rows:
        assert len(row) == len(conditioning.columns) and all(isinstance(c, Score) for c in row[1:])
        assert all(len(c.values) == 2 for c in row[1:])  # one value per fold

    assert "local contrastive loss only" in conditioning.note
    runs = tmp_path / "runs" / "runs"
    # Table 6's variants are pretrained with the local loss only (no neighbours), and the
    # neighbours study's k = 0 run is the same run as Table 6's Loc-CondConv
    assert sorted(p.name for p in runs.iterdir()) == ["loc_condconv-k0", "none-k0"]
    for run, expected in (("none-k0", {"conditioning": "none", "k_neighbours": 0}),
                          ("loc_condconv-k0", {"conditioning": "loc_condconv", "k_neighbours": 0})):
        state = torch.load(runs / run / "train" / "checkpoint_last.pt", weights_only=True)
        for key, setting in expected.items():
            assert state["config"][key] == setting
        assert state["config"]["max_steps"] == 2 and state["config"]["rep_dim"] == 16
    checkpoint = runs / "none-k0" / "train" / "checkpoint_last.pt"
    before = checkpoint.stat().st_mtime_ns
    run_ablations(config, progress=False)
    assert checkpoint.stat().st_mtime_ns == before  # a finished variant is not pretrained again


@pytest.mark.parametrize("change,message", [
    ({"conditioning": ["film"]}, "conditioning: unknown"),
    ({"neighbours": [-1]}, r"neighbours: expected an integer in \[0, inf\)"),
    ({"inference_locations": ["shuffled"]}, "inference_locations: unknown"),
    ({"folds": 1}, r"folds: expected an integer in \[2, inf\)"),
    ({"train": {"k_neighbours": 2}}, r"train: \['k_neighbours'\] are set by the ablation"),
    ({"epochs": 3}, r"unknown key\(s\) \['epochs'\]"),
])
def test_bad_configs_name_the_file(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"store": "s", "atlas": "a", "clinical": "c", "out": "o",
                                    **change}))
    with pytest.raises(ValueError, match=f"bad.yaml: .*{message}"):
        AblationConfig.load(path)
