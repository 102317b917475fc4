"""Synthetic cohort speed: one subject per size, and the two choices that set it.

Run: ``taskset -c 0 .venv/bin/python -m pytest benchmarks/bench_synthetic.py --benchmark-only
-s``: one core. The two comparisons time their variants interleaved round by round
(benchmarks/interleave.py) and print the median per-round ratio with its spread.

- render: plan + disease + sampling + scanner effects of one subject (no files), small and full,
  generator version 2 against version 1.
- sampling: the separable per-slab template -> subject sampling (``scanner.sample_template``:
  per-slab coordinates, looked up with torch's ``grid_sample``) against the reference: every
  voxel's template position by the pointwise float64 map
  (``SubjectTransform.subject_to_template``), then ``ndimage.map_coordinates``.
- writing: the three NIfTI files of a full-size subject through ``files.write_nifti`` (ISA-L
  gzip level 1, mtime 0) against ``nibabel.save`` (zlib gzip level 1), the previous design.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from interleave import interleave

from drasclr.data.synthetic.anatomy import HU_AIR, template_anatomy
from drasclr.data.synthetic.cohort import plan_subject, render_subject
from drasclr.data.synthetic.files import write_nifti
from drasclr.data.synthetic.scanner import sample_template
from drasclr.data.synthetic.subject_anatomy import chest_geometry


@pytest.mark.parametrize("size, rounds", [("small", 5), ("full", 2)])
def test_render_subject(benchmark, size, rounds):
    """Version 2 (default) against version 1, interleaved round by round: plan + render of
    subject 1, no files; the shared grids are built before timing (once per process)."""
    template_anatomy(size)
    chest_geometry(size)
    chest_geometry("small")  # every size's shape calibration reads the small lungs
    benchmark.group = "synthetic: one subject"
    variants = {f"version_{v}": (lambda v=v: render_subject(plan_subject(0, 1, "copd", size,
                                                                         version=v)))
                for v in (1, 2)}
    rounds = benchmark.pedantic(lambda: interleave(variants, rounds), rounds=1, iterations=1)
    print(f"\nrender {size}, median s: version 2 {rounds.median('version_2'):.2f}, version 1 "
          f"{rounds.median('version_1'):.2f}; version 2 / version 1 per round: "
          f"{rounds.describe('version_2', 'version_1')}")


def _pointwise_sample(plan, template, hu, labels):
    shape = plan.scanner.shape
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = voxels.reshape(-1, 3) * plan.scanner.spacing_mm + plan.scanner.affine[:3, 3]
    coordinates = (plan.transform.subject_to_template(world) - template.affine[:3, 3]).T
    coordinates = coordinates.reshape(3, *shape)
    return (ndimage.map_coordinates(hu, coordinates, order=1, mode="constant", cval=HU_AIR),
            ndimage.map_coordinates(labels, coordinates, order=0, mode="constant", cval=0))


def test_sampling(benchmark):
    """Separable slabs against the pointwise reference, interleaved round by round (the
    reference takes minutes: 2 rounds). tests/test_synthetic.py checks the coordinates."""
    template = template_anatomy("small")
    plan = plan_subject(0, 1, "copd", "small", version=1)
    hu, labels = template.hu.copy(), template.lung.copy()
    benchmark.group = "synthetic: template -> subject sampling (small)"
    variants = {
        "separable_slabs": lambda: sample_template(plan.scanner, plan.transform, template.affine,
                                                   hu, labels),
        "pointwise_reference": lambda: _pointwise_sample(plan, template, hu, labels),
    }
    rounds = benchmark.pedantic(lambda: interleave(variants, 2, warmup=False), rounds=1,
                                iterations=1)
    print(f"\nsampling, seconds per round: {rounds.seconds}; reference / separable per round: "
          f"{rounds.describe('pointwise_reference', 'separable_slabs')}")
    assert rounds.median("separable_slabs") < rounds.median("pointwise_reference")


def test_write_full_subject(benchmark, tmp_path):
    """``files.write_nifti`` against ``nibabel.save`` for the three files of a full-size
    subject, interleaved round by round."""
    import nibabel as nib

    template_anatomy("full")
    image, lung, lesion, truth = render_subject(plan_subject(0, 1, "copd", "full", version=1))
    affine = np.asarray(truth["image_affine"])
    benchmark.group = "synthetic: write a full-size subject (3 files)"

    def writer(save):
        def write():
            for name, array in (("image", image), ("lung", lung), ("lesion", lesion)):
                save(tmp_path / f"{name}.nii.gz", array)
        return write

    variants = {
        "write_nifti": writer(lambda path, array: write_nifti(path, array, affine)),
        "nibabel_save": writer(lambda path, array: nib.save(nib.Nifti1Image(array, affine), path)),
    }
    rounds = benchmark.pedantic(lambda: interleave(variants, 5), rounds=1, iterations=1)
    print(f"\nwriting, median s: ours {rounds.median('write_nifti'):.2f}, nibabel "
          f"{rounds.median('nibabel_save'):.2f}; nibabel / ours per round: "
          f"{rounds.describe('nibabel_save', 'write_nifti')}")
    assert nib.load(tmp_path / "image.nii.gz").shape == image.shape
