"""Where the tests find real data: the authors' atlas lung mask and real chest CT scans with
reference lung masks ($DRASCLR_SHARED_DATA, default ``shared/data`` beside the checkout;
SHARED_DATA/real_ct/README.md names their sources). Tests that need them skip when absent."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DRASCLR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

REAL = SHARED_DATA / "real_ct"
LUNG1, COPD = "lung1-001_ct", "copdgene-10002K_ct-64"
SCANS = {LUNG1: "lung1-001_ct.nii.gz", COPD: "copdgene-10002K_ct-64.nrrd"}
REFERENCE_MASKS = {LUNG1: "lung1-001_lungs.nii.gz", COPD: "copdgene-10002K_wholelung-64.nrrd"}
ATLAS_MASK = SHARED_DATA / "atlas_lung_mask.nii.gz"
REAL_CT_AVAILABLE = ATLAS_MASK.exists() and all(
    (REAL / name).exists() for name in [*SCANS.values(), *REFERENCE_MASKS.values()])
