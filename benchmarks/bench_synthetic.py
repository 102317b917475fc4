"""Synthetic cohort speed: one subject per size, and the two choices that set it.

Run: ``taskset -c 0 .venv/bin/python -m pytest benchmarks/bench_synthetic.py --benchmark-only
--benchmark-columns=min,median,rounds --benchmark-timer=time.process_time``: one core, CPU time
(on a shared machine wall time mostly measures the other jobs).

- render: plan + disease + sampling + scanner effects of one subject (no files), small and full.
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

from drasclr.data.synthetic.anatomy import HU_AIR, template_anatomy
from drasclr.data.synthetic.cohort import plan_subject, render_subject
from drasclr.data.synthetic.files import write_nifti
from drasclr.data.synthetic.scanner import sample_template


@pytest.mark.parametrize("size, rounds", [("small", 5), ("full", 2)])
def test_render_subject(benchmark, size, rounds):
    template_anatomy(size)  # built once per process, not part of a subject's cost
    benchmark.group = "synthetic: one subject"
    image, *_ = benchmark.pedantic(lambda: render_subject(plan_subject(0, 1, "copd", size)),
                                   rounds=rounds, iterations=1)
    assert image.dtype == np.int16


def _pointwise_sample(plan, template, hu, labels):
    shape = plan.scanner.shape
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = voxels.reshape(-1, 3) * plan.scanner.spacing_mm + plan.scanner.affine[:3, 3]
    coordinates = (plan.transform.subject_to_template(world) - template.affine[:3, 3]).T
    coordinates = coordinates.reshape(3, *shape)
    return (ndimage.map_coordinates(hu, coordinates, order=1, mode="constant", cval=HU_AIR),
            ndimage.map_coordinates(labels, coordinates, order=0, mode="constant", cval=0))


@pytest.mark.parametrize("method", ["separable_slabs", "pointwise_reference"])
def test_sampling(benchmark, method):
    template = template_anatomy("small")
    plan = plan_subject(0, 1, "copd", "small")
    hu, labels = template.hu.copy(), template.lung.copy()
    benchmark.group = "synthetic: template -> subject sampling (small)"

    def run():
        if method == "separable_slabs":
            return sample_template(plan.scanner, plan.transform, template.affine, hu, labels)
        return _pointwise_sample(plan, template, hu, labels)

    # The reference takes minutes: one round. tests/test_synthetic.py checks the coordinates.
    out_hu, _ = benchmark.pedantic(run, rounds=1 if method == "pointwise_reference" else 3,
                                   iterations=1)
    assert out_hu.shape == plan.scanner.shape


@pytest.mark.parametrize("writer", ["write_nifti", "nibabel_save"])
def test_write_full_subject(benchmark, writer, tmp_path):
    import nibabel as nib

    template_anatomy("full")
    image, lung, lesion, truth = render_subject(plan_subject(0, 1, "copd", "full"))
    affine = np.asarray(truth["image_affine"])
    benchmark.group = "synthetic: write a full-size subject (3 files)"

    def write():
        for name, array in (("image", image), ("lung", lung), ("lesion", lesion)):
            path = tmp_path / f"{name}.nii.gz"
            if writer == "write_nifti":
                write_nifti(path, array, affine)
            else:
                nib.save(nib.Nifti1Image(array, affine), path)

    benchmark.pedantic(write, rounds=2, iterations=1)
    assert nib.load(tmp_path / "image.nii.gz").shape == image.shape
