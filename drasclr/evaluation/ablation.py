"""Ablations of DrasCLR: variants that differ in one thing (Yu et al. 2023, Section 4.4).

Three studies, each a table in the report's layout:

- **conditioning** (the paper's Table 6): how location enters the encoder, ``none``,
  ``concat``, ``hypernetwork`` or ``loc_condconv``; one pretraining run per variant, with the
  local contrastive loss only (no neighbour loss: ``k_neighbours=0``), as the paper trains
  them (Section 4.4.1);
- **neighbours** (Table 8): the number of neighbouring patches in the loss, 0 to 3;
- **inference locations** (Table 7): the DrasCLR encoder given the true atlas coordinates of
  the detection boxes, or random ones (uniform in [-1, 1]^3), at inference.

The measures are the paper's: the subject-level linear readout (R^2 of log FEV1pp and log
FEV1/FVC, accuracy of GOLD and CLE) of the first two studies, and the detection linear probe's
F1 for the third. Every variant pretrains into ``out/<study>/<value>/`` with the shared
settings of ``train`` into ``out/runs/<conditioning>-k<neighbours>/`` (so a re-run resumes from
each run's checkpoint, a finished run is not redone, and a run two studies share, such as
Loc-CondConv with the local loss only, is trained once) and saves its features beside.

``drasclr ablate --config ABLATION.yaml`` runs it from a file; ``examples/ablation.yaml`` is a
small one for the CPU. For a real study, pretrain each variant as long as the main model (the
paper: 20 epochs of batch 128 over the whole cohort), with hundreds of subjects.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from drasclr.deprecated_names import CONFIG_KEYS, renamed_keys
from drasclr.evaluation.report import Score, Section, Table
from drasclr.nn.conditioning import CONDITIONINGS
from drasclr.ranges import COUNT, Interval, check_number, check_numbers

STUDIES = ("conditioning", "neighbours", "inference_locations")
#: Readout tasks of the ablation tables (the paper's Tables 6 and 8 columns).
ABLATION_TASKS = ("log_fev1pp", "log_fev1_fvc", "gold", "cle")
LOCATIONS = ("true", "random")


@dataclass
class AblationConfig:
    """What ``run_ablations`` does. Paths are taken relative to the config file's folder.

    Attributes:
        store, atlas: the patch store and its atlas (``drasclr preprocess``).
        clinical: the clinical table of the store's subjects (the readout labels).
        annotations: detection boxes (``annotations.csv``); without it the inference-locations
            study is skipped.
        out: the folder of every run, feature file and table.
        train: ``TrainConfig`` fields shared by every pretraining run (steps, batch, queue).
        conditioning / neighbours / inference_locations: the values each study compares;
            an empty list skips that study.
        folds, seed: cross-validation of every measure.
    """

    store: str
    atlas: str
    clinical: str
    out: str
    annotations: str | None = None
    train: dict = field(default_factory=dict)
    conditioning: list[str] = field(default_factory=lambda: list(CONDITIONINGS))
    neighbours: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    inference_locations: list[str] = field(default_factory=lambda: list(LOCATIONS))
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.conditioning) - set(CONDITIONINGS)
        if unknown:
            raise ValueError(f"conditioning: unknown {sorted(unknown)}, expected some of "
                             f"{CONDITIONINGS}")
        check_numbers("neighbours", self.neighbours, COUNT, allow_empty=True)
        unknown = set(self.inference_locations) - set(LOCATIONS)
        if unknown:
            raise ValueError(f"inference_locations: unknown {sorted(unknown)}, expected some of "
                             f"{LOCATIONS}")
        check_number("folds", self.folds, Interval(2, integer=True))
        check_number("seed", self.seed, COUNT)
        self.train = renamed_keys(self.train, CONFIG_KEYS, "train")  # old spellings still work
        shared = {"store", "atlas", "out_dir", "conditioning", "k_neighbours"} & set(self.train)
        if shared:
            raise ValueError(f"train: {sorted(shared)} are set by the ablation itself")

    @classmethod
    def load(cls, path: str | Path) -> "AblationConfig":
        """Read a YAML file; unknown keys and missing ones are ValueErrors naming the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ablation config")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        missing = sorted({"store", "atlas", "clinical", "out"} - set(values))
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}")
        for key in ("store", "atlas", "clinical", "out", "annotations"):
            if values.get(key) is not None:
                values[key] = str(path.parent / str(values[key]))
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None


def run_ablations(config: AblationConfig, progress: bool = True) -> list[Section]:
    """Pretrain, extract and measure every variant; one report section per study."""
    from drasclr.evaluation.data import load_clinical

    clinical = load_clinical(config.clinical)  # checked before any pretraining
    sections = []
    if config.conditioning:
        runs = {value: _pretrain(config, progress, conditioning=value, k_neighbours=0)
                for value in config.conditioning}
        sections.append(_readout_section(
            config, clinical, "Conditioning: how location enters the encoder (Table 6)",
            {_CONDITIONING_NAMES[v]: path for v, path in runs.items()}, progress,
            "local contrastive loss only"))
    if config.neighbours:
        runs = {k: _pretrain(config, progress, k_neighbours=k) for k in config.neighbours}
        sections.append(_readout_section(
            config, clinical, "Neighbouring contrastive loss: number of neighbours (Table 8)",
            {("no neighbouring contrast" if k == 0 else f"{k} neighbour(s)"): path
             for k, path in runs.items()}, progress))
    if config.inference_locations and config.annotations:
        sections.append(_locations_section(config, _pretrain(config, progress)))
    return sections


_CONDITIONING_NAMES = {"none": "no conditioning", "concat": "concatenation",
                       "hypernetwork": "hypernetwork", "loc_condconv": "Loc-CondConv (DrasCLR)"}


def _pretrain(config: AblationConfig, progress: bool, conditioning: str = "loc_condconv",
              k_neighbours: int | None = None) -> Path:
    """The checkpoint of one variant, pretrained (or resumed) in
    ``out/runs/<conditioning>-k<k>/train``: the studies share the run of DrasCLR's own
    settings (Loc-CondConv with the default neighbours) instead of training it twice."""
    from drasclr.pretrain import TrainConfig, train

    if k_neighbours is None:
        k_neighbours = TrainConfig.__dataclass_fields__["k_neighbours"].default
    run_dir = Path(config.out) / "runs" / f"{conditioning}-k{k_neighbours}" / "train"
    settings = {"seed": config.seed, "progress": progress, "tensorboard": False, **config.train}
    return Path(train(store=config.store, atlas=config.atlas, out_dir=str(run_dir),
                      conditioning=conditioning, k_neighbours=k_neighbours, **settings).checkpoint)


def _readout_section(config: AblationConfig, clinical, title: str, checkpoints: dict,
                     progress: bool, loss: str = "") -> Section:
    from drasclr.evaluation.readout import readout_scores
    from drasclr.features import FeatureSet, extract_features

    rows = []
    for name, checkpoint in checkpoints.items():
        features_path = checkpoint.parent.parent / "features.npz"
        if (features_path.exists()
                and features_path.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns):
            features = FeatureSet.load(features_path)  # a shared run, already extracted
            features.metadata["name"] = name
        else:
            features = extract_features(checkpoint, config.store, out=features_path, name=name,
                                        progress=progress)
        scores = readout_scores(features, clinical, ABLATION_TASKS, folds=config.folds,
                                seed=config.seed)
        rows.append([name, *(scores[task] for task in ABLATION_TASKS)])
    table = Table(title, ["variant", "log FEV1pp R²", "log FEV1/FVC R²", "GOLD accuracy",
                          "CLE accuracy"], rows,
                  note=f"Linear readout, {config.folds}-fold cross-validation, mean ± SD; "
                       "every variant pretrained with the same settings"
                       + (f" ({loss})." if loss else "."))
    return Section(title, tables=[table])


def _locations_section(config: AblationConfig, checkpoint: Path) -> Section:
    from drasclr.evaluation.detection import (
        PROBE_DRASCLR, SUBTYPES, DetectionConfig, evaluate_detection)
    from drasclr.evaluation.detection_patches import detection_patches
    from drasclr.checkpoint_formats import load_encoder

    data = detection_patches(config.annotations, config.store)
    encoder = load_encoder(checkpoint)
    # The paper's Table 7 classifies the extracted representation of each box's patch: scored
    # on the centre patch, not by the voxel rule (whose maps a random coordinate would also
    # have to replace voxel by voxel).
    detection = DetectionConfig(folds=config.folds, seed=config.seed, rule="centre")
    f1: dict[str, dict[str, Score]] = {}
    for locations in config.inference_locations:
        boxes = data
        if locations == "random":
            rng = np.random.default_rng(config.seed)
            boxes = replace(data, coords=rng.uniform(-1, 1, data.coords.shape).astype(np.float32))
        result = evaluate_detection(boxes, encoder, detection, methods=[PROBE_DRASCLR])
        f1[locations] = {s: result.scores[PROBE_DRASCLR][s].f1 for s in SUBTYPES}
    columns = [f"{'patch' if loc == 'true' else 'random'} location F1"
               for loc in config.inference_locations]
    rows = [[subtype, *(f1[loc][subtype] for loc in config.inference_locations)]
            for subtype in SUBTYPES]
    title = "Anatomical location at inference (Table 7)"
    return Section(title, tables=[Table(
        title, ["subtype", *columns], rows,
        note="Linear probe of emphysema subtype vs healthy boxes (their centre patch) on the "
             "frozen DrasCLR encoder, "
             f"{config.folds}-fold subject-disjoint cross-validation; random: every box gets "
             "a coordinate drawn uniformly from [-1, 1]^3.")])


def studies_of(config: AblationConfig) -> Sequence[str]:
    """The studies a config runs (for messages and the CLI's summary)."""
    return [s for s, values in (("conditioning", config.conditioning),
                                ("neighbours", config.neighbours),
                                ("inference_locations",
                                 config.inference_locations if config.annotations else []))
            if values]
