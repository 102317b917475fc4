"""``drasclr densemap``: voxel-wise probability map of an emphysema subtype (Yu et al. 2023,
Section 4.3.1, Fig. 3), written on the input scan's own grid so it overlays the scan.

    drasclr densemap --head HEAD.pt [--checkpoint CKPT] --image SCAN --store STORE \\
        --out MAP.nii.gz [--subject ID] [--step S] [--device auto] [--batch N]

``--subject`` defaults to the store subject whose manifest ``source`` is ``--image`` (or
whose id is the file's name); ``--checkpoint`` is needed only for a linear-probe head (a
fine-tuned head carries its encoder). ``--lesions`` scores the map against a true lesion
label file on the scan's grid (the synthetic cohort's ``lesions/<id>.nii.gz``) and
``--annotations`` the subject's 32 mm boxes by the paper's detection rule (a box is detected
when >= 25 % of its lung voxels have p > 0.5). ``--annotations`` refuses a subject whose boxes
trained the head (the head file records its training subjects; a head file without that
record is scored with a warning). An interrupted run resumes from the chunks kept beside the output.
"""
from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--head", required=True, help="head file (drasclr-head, from `drasclr detect`)")
    parser.add_argument("--checkpoint", help="encoder checkpoint (needed for a linear-probe head)")
    parser.add_argument("--image", required=True, help="the scan to map (NIfTI, NRRD, MHA, DICOM folder)")
    parser.add_argument("--store", required=True,
                        help="patch store holding the subject's registration (and naming the atlas)")
    parser.add_argument("--subject", help="subject id in the store (default: found from --image)")
    parser.add_argument("--out", required=True, help="output map, .nii.gz or .nii")
    parser.add_argument("--step", type=_positive_int, default=1,
                        help="evaluate every S-th voxel and interpolate (default 1: every voxel)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ...")
    parser.add_argument("--batch", type=_positive_int, default=None,
                        help="patches per forward pass (default 16 on CPU, 512 on CUDA)")
    parser.add_argument("--lung-mask", help="lung label file on the scan's grid (default: segment)")
    parser.add_argument("--percent", action="store_true", help="write uint8 percent, not float32")
    parser.add_argument("--fp32", action="store_true",
                        help="float32 throughout (default: bf16 autocast where it pays, "
                             "see drasclr.precision)")
    parser.add_argument("--lesions", help="true lesion labels on the scan's grid: print AUC and Dice")
    parser.add_argument("--lesion-value", type=int, default=None,
                        help="label of the subtype in --lesions (default: from the head's label, "
                             "centrilobular 1, paraseptal 2, panlobular 3)")
    parser.add_argument("--annotations",
                        help="CSV of boxes (subject_id, label, x_mm, y_mm, z_mm): print box-level "
                             "precision, recall, F1 by the paper's rule (25%% of the box's lung "
                             "voxels > 0.5); refused when the head was trained on this "
                             "subject's boxes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from drasclr.device import resolve_device
    from drasclr.evaluation import densemap as dm
    from drasclr.evaluation.head import load_head

    if args.step < 1:  # argparse already refuses; the API is called with the same check
        raise ValueError(f"--step: expected at least 1, got {args.step}")
    device = resolve_device(args.device)
    if args.annotations:  # refused before the mapping, which can take long, not after it
        subject = args.subject or dm.subject_of_image(args.store, args.image)
        dm.check_not_trained_on(load_head(args.head)[2]["training_subjects"], subject, args.head,
                                warn=False)
    on_gpu = device.type == "cuda"
    result = dm.densemap(
        args.image, args.store, args.out, args.head, args.checkpoint, args.subject,
        step=args.step, batch=args.batch or (512 if on_gpu else 16), device=device,
        amp=not args.fp32,
        lung_mask=args.lung_mask, percent=args.percent, progress=not args.no_progress,
    )
    print(f"{result.path}: P({result.label}) of subject {result.subject_id}, step "
          f"{result.step}, {result.voxels} lung voxels in {result.seconds:.1f} s")
    if args.lesions:
        evaluation = dm.evaluate_map(result, args.lesions, lesion_label=args.lesion_value)
        scores = evaluation.scores()
        print(f"against {args.lesions}: voxel AUC {scores['auc']:.3f}, Dice {scores['dice']:.3f}, "
              f"lesion {100 * scores['prevalence']:.2f}% of {scores['voxels']} lung voxels")
    if args.annotations:
        boxes = dm.box_evaluation(result, args.annotations)
        print(f"boxes of {args.annotations}: {boxes['positive']} {result.label}, "
              f"{boxes['boxes'] - boxes['positive']} healthy; precision "
              f"{boxes['precision']:.3f}, recall {boxes['recall']:.3f}, F1 {boxes['f1']:.3f}")
    return 0
