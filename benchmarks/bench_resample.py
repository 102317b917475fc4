"""Our resampler and DICOM reader against the libraries that already do it: speed and values.

Resampling a CT to 1 mm (cubic B-spline), on synthetic subjects of ``drasclr synth``:

- ``ours``: ``drasclr.data.resample.resample_isotropic`` (separable B-spline in numpy);
- ``ants``: ``ants.resample_image(image, (1, 1, 1), interp_type=4)``: ITK's B-spline
  interpolator of order 3;
- ``monai``: ``monai.transforms.Spacing(pixdim=1, mode=3, padding_mode="mirror")``: spline
  order 3 through scipy's ``map_coordinates`` (MONAI's numpy backend), with the same boundary
  rule as ours and ITK's (another rule changes the values near the scan's edge).

All three keep the input's origin and step 1 mm along its axes; they differ only in how far the
grid extends (a voxel more or less at the far end), so values are compared on the voxels all
three have, inside the body (``ours`` above -500 HU, holes filled: the lungs count as body).

Reading a DICOM series (each subject written as one slice per file, shuffled names):

- ``ours``: ``drasclr.data.io.read_ct`` (pydicom, sorted along the slice normal, rescaled);
- ``ants``: ``ants.dicom_read``, the DICOM series reader antspyx offers: it stacks the
  ``.dcm`` files in directory-listing order, with the first file's origin and a 1 mm slice
  step, so its values land at other world points than the slices' own (the share of
  coinciding voxels is printed);
- ``monai``: ``monai.transforms.LoadImage(reader="PydicomReader")``.

Values are compared at the same world points (each reader's own geometry), so a wrong
orientation or origin shows as a difference.

Variants run interleaved round by round (benchmarks/interleave.py); ratios are the median of
the per-round time ratios to ``ours``, with their min-max. Everything runs on one core: ITK is
given one thread (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``, as each preprocessing worker
runs), numpy and scipy use one anyway.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_resample.py [--subjects 2]
        [--size small|full] [--rounds 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # before ITK first runs

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from drasclr.data.io import CTVolume, ras_affine_from_lps, read_ct, to_ants  # noqa: E402
from drasclr.data.resample import resample_isotropic  # noqa: E402
from interleave import interleave  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def resamplers(volume: CTVolume) -> dict:
    """name -> callable returning (array, affine) of ``volume`` at 1 mm."""
    import ants
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    image = to_ants(volume.array, volume.affine)
    spacing = Spacing(pixdim=(1.0, 1.0, 1.0), mode=3, padding_mode="mirror")
    meta = MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array))[None],
                      affine=torch.from_numpy(volume.affine))

    def ours():
        out = resample_isotropic(volume, 1.0)
        return out.array, out.affine

    def with_ants():
        out = ants.resample_image(image, (1.0, 1.0, 1.0), use_voxels=False, interp_type=4)
        return out.numpy(), ras_affine_from_lps(out.origin, out.spacing, out.direction)

    def with_monai():
        out = spacing(meta)
        return out.array[0], np.asarray(out.affine, dtype=np.float64)

    return {"ours": ours, "ants": with_ants, "monai": with_monai}


def dicom_readers(folder: Path) -> dict:
    """name -> callable returning (array, affine) of the DICOM series in ``folder``."""
    import ants
    from monai.transforms import LoadImage

    load = LoadImage(reader="PydicomReader", image_only=True)

    def ours():
        volume = read_ct(folder)
        return volume.array, volume.affine

    def with_ants():
        image = ants.dicom_read(str(folder))
        return image.numpy(), ras_affine_from_lps(image.origin, image.spacing, image.direction)

    def with_monai():
        image = load(str(folder))
        return np.asarray(image), np.asarray(image.affine, dtype=np.float64)  # RAS

    return {"ours": ours, "ants": with_ants, "monai": with_monai}


def on_grid(array: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """``array`` (world geometry ``affine``) at the voxels of a grid of ``shape`` and
    ``target_affine`` that coincide with its own voxels; NaN where it has none."""
    to_source = np.linalg.inv(affine) @ target_affine
    index = np.indices(shape).reshape(3, -1).T @ to_source[:3, :3].T + to_source[:3, 3]
    nearest = np.rint(index).astype(np.int64)
    inside = ((nearest >= 0) & (nearest < array.shape)).all(axis=1)
    inside &= np.abs(index - nearest).max(axis=1) < 1e-3  # a coinciding voxel, not a neighbour
    values = np.full(len(index), np.nan, np.float32)
    values[inside] = array[tuple(nearest[inside].T)]
    return values.reshape(shape)


def differences(outputs: dict, mask_of) -> dict:
    """Max and mean |other - ours| (HU) on the voxels where both exist and ``mask_of(ours)``."""
    ours, ours_affine = outputs["ours"]
    mask = mask_of(ours)
    result = {}
    for name, (array, affine) in outputs.items():
        if name == "ours":
            continue
        other = on_grid(array, affine, ours.shape, ours_affine)
        both = mask & np.isfinite(other)
        diff = np.abs(other[both] - ours[both])
        result[name] = (float(diff.max()), float(diff.mean()), float(both.sum() / mask.sum()))
    return result


def body(hu: np.ndarray) -> np.ndarray:
    """Inside the body: above -500 HU, with the lungs (holes of each axial slice) filled."""
    solid = hu > -500
    return np.stack([ndimage.binary_fill_holes(solid[..., k]) for k in range(hu.shape[2])], -1)


def write_series(volume: CTVolume, folder: Path, seed: int) -> None:
    """``volume`` as a DICOM series with the writer of tests/test_io.py, plus the
    InstanceNumber a scanner writes (MONAI's reader orders slices by it)."""
    import pydicom

    spec = importlib.util.spec_from_file_location("test_io", REPO_ROOT / "tests" / "test_io.py")
    test_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_io)
    hu = np.clip(np.rint(volume.array), -1024, 3000)
    test_io._write_dicom_series(folder, hu, tuple(volume.spacing), (0.0, 0.0, 0.0),
                                np.random.default_rng(seed))
    (folder / "notes.txt").unlink()  # the writer's stray file, which ITK's reader refuses
    for path in folder.glob("slice*.dcm"):
        dataset = pydicom.dcmread(path)
        dataset.InstanceNumber = int(path.stem[len("slice"):]) + 1
        dataset.save_as(path, enforce_file_format=True)


def report(title: str, rounds, diffs: dict, voxels: int) -> None:
    print(f"\n{title}: {voxels / 1e6:.1f} M voxels; median s: "
          + ", ".join(f"{n} {rounds.median(n):.3f}" for n in rounds.seconds))
    for name, (largest, mean, share) in diffs.items():
        print(f"  {name}: time / ours {rounds.describe(name, 'ours')}; |{name} - ours| max "
              f"{largest:.3g} HU, mean {mean:.3g} HU on {share:.1%} of the compared voxels")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=2, help="synthetic subjects")
    parser.add_argument("--size", default="small", choices=("small", "full"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per subject")
    args = parser.parse_args(argv)
    from drasclr.data.synthetic import generate_cohort

    with tempfile.TemporaryDirectory() as folder:
        cohort = generate_cohort(Path(folder) / "cohort", args.subjects, seed=0, size=args.size,
                                 workers=1, progress=False)
        for index, path in enumerate(sorted((cohort / "images").glob("*.nii.gz"))):
            volume = read_ct(path)
            label = f"{path.name.split('.')[0]} ({'x'.join(map(str, volume.array.shape))}, " \
                    f"{'x'.join(f'{s:.2f}' for s in volume.spacing)} mm)"
            variants = resamplers(volume)
            rounds = interleave(variants, args.rounds)
            outputs = {name: run() for name, run in variants.items()}
            report(f"resample {label} to 1 mm", rounds, differences(outputs, body),
                   outputs["ours"][0].size)

            series = Path(folder) / f"dicom{index}"
            write_series(volume, series, seed=index)
            variants = dicom_readers(series)
            rounds = interleave(variants, args.rounds)
            outputs = {name: run() for name, run in variants.items()}
            everywhere = lambda hu: np.ones(hu.shape, bool)  # noqa: E731
            report(f"read DICOM series of {label}", rounds, differences(outputs, everywhere),
                   volume.array.size)


if __name__ == "__main__":
    main()
