"""A real chest CT through drasclr, as one self-contained HTML figure.

    python examples/real_ct_figure.py --scan lung1-001_ct.nii.gz \
        --atlas-mask atlas_lung_mask.nii.gz --out real_ct_figure [--demo demo_output] \
        [--store STORE] [--step 4]

The scan is preprocessed with the atlas (``drasclr atlas`` + ``drasclr preprocess``, into
``<out>/store``; ``--store`` reuses a store that already holds it). The figure shows an axial
slice of the scan through the lungs with

1. the lung segmentation the store keeps (right lung red, left lung blue);
2. the atlas landmarks warped into the scan by the saved registration (those within half a
   landmark step of the slice);
3. a dense centrilobular-emphysema probability map (``drasclr.evaluation.densemap``) of that
   slice, every ``--step``-th voxel exact and the rest interpolated. The head is the demo's
   fine-tuned one when ``--demo`` names a ``drasclr demo`` output folder; otherwise a linear
   probe fitted on a tiny synthetic cohort over a randomly initialised encoder, which the
   figure says: its map shows the machinery working on real anatomy, not a diagnosis.

Writes ``<out>/real_ct_figure.html`` (PNGs embedded) and returns a dict of what it drew.
"""
from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=Path, required=True, help="a chest CT file")
    parser.add_argument("--atlas-mask", type=Path, help="atlas lung mask (NIfTI); not with --store")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--store", type=Path, help="a store that already holds the scan")
    parser.add_argument("--demo", type=Path, help="a `drasclr demo` output folder (its head)")
    parser.add_argument("--step", type=int, default=4, help="dense map: every step-th voxel exact")
    parser.add_argument("--synthetic-subjects", type=int, default=6,
                        help="size of the tiny cohort the fallback head is fitted on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from drasclr.data.io import read_ct
    from drasclr.data.resample import resample_isotropic
    from drasclr.evaluation.densemap import prepare_scan, probability_map, subject_of_image

    if (args.store is None) == (args.atlas_mask is None):
        parser.error("give --atlas-mask (to preprocess the scan) or --store (that holds it)")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.store or _preprocess(args.scan, args.atlas_mask, args.out / "store")
    subject_id = subject_of_image(store, args.scan)
    # The 1 mm scan with the lungs the store kept (prepare_scan leaves a 1 mm volume as it is).
    iso = resample_isotropic(read_ct(args.scan), 1.0)
    lung_labels = _stored_lung_labels(store, subject_id).on_grid(iso.array.shape, iso.affine)
    scan = prepare_scan(iso, store, subject_id, lung_mask=lung_labels > 0)

    head, encoder, provenance = (_demo_head(args.demo) if args.demo
                                 else _synthetic_head(args.out / "synthetic", args))
    # The slice through the most lung, along the scan's axis closest to world z.
    z_axis = int(np.argmax(np.abs(scan.iso.affine[2, :3])))
    other = tuple(a for a in range(3) if a != z_axis)
    z = int(np.argmax(scan.lung.sum(axis=other)))
    region = np.zeros(scan.lung.shape, dtype=bool)
    np.moveaxis(region, z_axis, 0)[z] = True
    probability = probability_map(encoder, head, scan, step=args.step, region=region,
                                  device="cpu", amp=False, progress=False)

    # Landmarks: atlas centres -> scan world (inverse of subject-to-atlas) -> 1 mm voxels.
    atlas = scan.atlas
    to_subject = np.linalg.inv(scan.subject_to_atlas)
    world = atlas.centres_world() @ to_subject[:3, :3].T + to_subject[:3, 3]
    to_voxel = np.linalg.inv(scan.iso.affine)
    landmarks = world @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    near = np.abs(landmarks[:, z_axis] - z) <= atlas.step / 2

    images = _panels(scan.iso.array, scan.iso.affine, lung_labels, probability,
                     landmarks[near][:, list(other)], z_axis, z)
    html = _html(args.scan.name, subject_id, provenance, images, int(near.sum()), args.step)
    path = args.out / "real_ct_figure.html"
    path.write_text(html)
    print(f"{path}: slice {z} of {scan.iso.array.shape[z_axis]}, {int(near.sum())} landmarks drawn")
    return {"html": path, "slice": z, "z_axis": z_axis, "landmarks_drawn": int(near.sum()),
            "probability": np.take(probability, z, axis=z_axis),
            "lung": np.take(scan.lung, z, axis=z_axis), "provenance": provenance}


def _preprocess(scan: Path, atlas_mask: Path, store: Path) -> Path:
    from drasclr.data.atlas import build_atlas
    from drasclr.data.preprocess import preprocess

    atlas_path = store.parent / "atlas.npz"
    if not atlas_path.exists():
        build_atlas(atlas_mask).save(atlas_path)
    images = store.parent / "images"
    images.mkdir(exist_ok=True)
    link = images / scan.name
    if not link.exists():
        link.symlink_to(scan.resolve())
    summary = preprocess(images, atlas_path, store, progress=False)
    if summary.failed:
        raise SystemExit(f"{scan}: preprocessing failed; see {store / 'manifest.csv'}")
    return store


def _stored_lung_labels(store: Path, subject_id: str):
    import nibabel as nib

    from drasclr.data.lung_segmentation import LungMask
    from drasclr.data.store import lung_mask_path

    image = nib.load(str(lung_mask_path(store, subject_id)))
    return LungMask(np.asarray(image.dataobj), image.affine)


def _demo_head(demo: Path):
    from drasclr.evaluation.head import head_and_encoder

    heads = sorted(demo.rglob("head_centrilobular_finetune.pt"))
    if not heads:
        raise SystemExit(f"{demo}: no head_centrilobular_finetune.pt (run `drasclr demo` first)")
    head, encoder, _ = head_and_encoder(heads[0])
    return head.eval(), encoder, f"the demo's fine-tuned centrilobular head ({heads[0]})"


def _synthetic_head(folder: Path, args):
    """A linear centrilobular probe fitted on a tiny synthetic COPD cohort, over a seeded random
    encoder whose BatchNorm statistics come from the cohort's patches."""
    from drasclr.data.atlas import build_atlas
    from drasclr.data.preprocess import preprocess
    from drasclr.data.synthetic import generate_cohort
    from drasclr.evaluation.detection import calibrated_random_encoder, save_detection_heads
    from drasclr.evaluation.detection_patches import detection_patches
    from drasclr.evaluation.head import load_head
    from drasclr.nn import Encoder

    if not (folder / "cohort" / "cohort.json").exists():
        generate_cohort(folder / "cohort", args.synthetic_subjects, seed=args.seed, kind="copd",
                        size="small", workers=1, progress=False)
    atlas_path = folder / "atlas.npz"
    if not atlas_path.exists():
        build_atlas(folder / "cohort" / "template" / "lung_mask.nii.gz").save(atlas_path)
    preprocess(folder / "cohort" / "images", atlas_path, folder / "store", progress=False)
    data = detection_patches(folder / "cohort" / "annotations.csv", folder / "store")
    torch.manual_seed(args.seed)
    encoder = Encoder(rep_dim=32, moco_dim=16, num_experts=2, backend="grouped")
    encoder = calibrated_random_encoder(encoder, data, 64, torch.device("cpu")).eval()
    [path] = save_detection_heads(data, encoder, folder, f"random init (seed {args.seed})",
                                  subtypes=["centrilobular"], kinds=["probe"])
    head, _, _ = load_head(path)
    return head.eval(), encoder, (
        f"a linear probe fitted on a tiny synthetic cohort ({args.synthetic_subjects} subjects) "
        "over a randomly initialised encoder: the machinery on real anatomy, not a trained "
        "detector; give --demo for the demo's head")


def _panels(hu, affine, labels, probability, landmarks, z_axis, z) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def axial(volume):
        return np.take(volume, z, axis=z_axis).T  # rows: the second in-plane axis

    columns, rows = (a for a in range(3) if a != z_axis)

    def grey(axis):
        axis.imshow(np.clip(axial(hu), -1024, 240), cmap="gray", origin="lower")
        # Radiological view: anterior up, the patient's right on the viewer's left.
        if affine[1, rows] < 0:
            axis.invert_yaxis()
        if affine[0, columns] > 0:
            axis.invert_xaxis()
        axis.axis("off")

    def png(figure) -> str:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        return base64.b64encode(buffer.getvalue()).decode()

    panels = []
    figure, axis = plt.subplots(figsize=(6, 6))
    grey(axis)
    for side, colour in ((1, "red"), (2, "deepskyblue")):
        if (axial(labels) == side).any():
            axis.contour(axial(labels) == side, levels=[0.5], colors=colour, linewidths=1.0)
    axis.set_title("lung segmentation (red: right, blue: left)", fontsize=10)
    panels.append(("Lung segmentation kept in the store", png(figure)))

    figure, axis = plt.subplots(figsize=(6, 6))
    grey(axis)
    axis.contour(axial(labels) > 0, levels=[0.5], colors="yellow", linewidths=0.6)
    axis.scatter(landmarks[:, 0], landmarks[:, 1], s=18, c="lime", edgecolors="black",
                 linewidths=0.5)
    axis.set_title(f"atlas landmarks warped into the scan ({len(landmarks)} near this slice)",
                   fontsize=10)
    panels.append(("Atlas landmarks", png(figure)))

    figure, axis = plt.subplots(figsize=(6.6, 6))
    grey(axis)
    lung = axial(labels) > 0
    shown = np.ma.masked_where(~lung, axial(probability))
    image = axis.imshow(shown, cmap="magma", vmin=0, vmax=1, alpha=0.6, origin="lower")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="P(centrilobular)")
    axis.set_title("dense map of the slice", fontsize=10)
    panels.append(("Dense centrilobular probability map", png(figure)))
    return panels


def _html(scan_name, subject_id, provenance, images, landmarks, step) -> str:
    figures = "\n".join(
        f'<figure><figcaption>{title}</figcaption><img src="data:image/png;base64,{data}"></figure>'
        for title, data in images)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>drasclr on a real CT: {subject_id}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:1em auto}}
figure{{display:inline-block;margin:0.5em;vertical-align:top}}img{{max-width:540px}}
figcaption{{font-weight:bold}}</style></head><body>
<h1>drasclr on a real chest CT: {scan_name}</h1>
<p>Axial slice through the most lung, on the 1 mm grid of <code>drasclr preprocess</code>.
{landmarks} atlas landmarks lie within half a landmark step of the slice. The dense map
evaluates every {step}th voxel exactly (the 32<sup>3</sup> patch centred on it, conditioned on
its atlas coordinate) and interpolates the rest.</p>
<p><b>Head:</b> {provenance}.</p>
{figures}
</body></html>
"""


if __name__ == "__main__":
    main()
