"""Dense voxel probability maps of an emphysema subtype (Yu et al. 2023, Section 4.3.1, Fig. 3).

The paper slides its subtype classifier over the lung with step 1: every lung voxel gets the
probability computed from the 32^3 patch centred on it, the encoder conditioned on that
voxel's own atlas location. One job per module:

- :mod:`~drasclr.evaluation.densemap.scan`: the scan read, resampled to 1 mm, its lungs and
  its saved registration (:class:`PreparedScan`);
- :mod:`~drasclr.evaluation.densemap.window`: the exact window at any voxels
  (:func:`exact_probabilities`);
- :mod:`~drasclr.evaluation.densemap.chunks`: the resumable, atomically written chunk results;
- :mod:`~drasclr.evaluation.densemap.maps`: whole maps (every S-th voxel, then trilinear
  interpolation), written on the scan's own grid (:func:`densemap`, ``drasclr densemap``);
- :mod:`~drasclr.evaluation.densemap.scoring`: the paper's box rule over the box's lung voxels
  and agreement with the synthetic cohort's true lesions (:func:`evaluate_map`);
- :mod:`~drasclr.evaluation.densemap.sections`: overlays and the report table.

There is no fully convolutional "fast" map: run over a block with dilated layers it sees the
real neighbourhood where the exact window zero-pads every layer, so it is a different
estimator, not a faster one (``benchmarks/dense_pass.py`` keeps it for the benchmark).
"""
from drasclr.evaluation.densemap.chunks import ChunkCache, fingerprint
from drasclr.evaluation.densemap.maps import (
    DenseMapResult, check_step, densemap, grid_points_for, interpolate_grid, probability_map,
    to_original_grid, work_dir_for, write_map,
)
from drasclr.evaluation.densemap.scan import (
    PreparedScan, labels_on_grid, prepare_scan, store_atlas_and_transform, subject_of_image,
)
from drasclr.evaluation.densemap.scoring import (
    DETECTION_FRACTION, DETECTION_THRESHOLD, LESION_LABELS, MapEvaluation, box_detections,
    box_evaluation, box_scores, box_scores_of_counts, box_voxels, check_not_trained_on,
    detected_by_fraction, evaluate_map, lesion_value, lung_fraction_above, subject_boxes,
    truth_scores,
)
from drasclr.evaluation.densemap.sections import overlay_figure, report_sections
from drasclr.evaluation.densemap.window import HALF, PatchGatherer, autocast, exact_probabilities

__all__ = [
    "DETECTION_FRACTION", "DETECTION_THRESHOLD", "HALF", "LESION_LABELS", "ChunkCache",
    "DenseMapResult", "MapEvaluation", "PatchGatherer", "PreparedScan", "autocast",
    "box_detections", "box_evaluation", "box_scores", "box_scores_of_counts", "box_voxels",
    "check_not_trained_on", "check_step", "densemap", "detected_by_fraction", "evaluate_map",
    "exact_probabilities", "fingerprint", "grid_points_for", "interpolate_grid", "labels_on_grid",
    "lesion_value", "lung_fraction_above", "overlay_figure", "prepare_scan", "probability_map",
    "report_sections", "store_atlas_and_transform", "subject_boxes", "subject_of_image",
    "to_original_grid", "truth_scores", "work_dir_for", "write_map",
]
