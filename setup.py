"""drasclr: fast, complete DrasCLR (anatomy-aware contrastive learning for 3D lung CT).

`kernels/` is shipped as the subpackage `drasclr.kernels` (never a top-level `kernels`).
"""
from setuptools import find_packages, setup

setup(
    name="drasclr",
    version="0.1.0",
    description="Anatomy-aware self-supervised learning for 3D lung CT (DrasCLR), fast",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["drasclr", "drasclr.*"]) + ["drasclr.kernels"],
    package_dir={"drasclr.kernels": "kernels"},
    install_requires=[
        # torch is deliberately unpinned so an existing (e.g. CUDA) build is kept;
        # scripts/setup_env.sh installs torch==2.13.0 only where none is present.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "monai>=1.3",
        "antspyx>=0.5",
        "nibabel>=5.0",
        "isal>=1.6",  # fast deterministic gzip for the synthetic cohort's NIfTI files
        "pydicom>=2.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.9",  # the version scikit-survival 0.28 needs
        "scikit-survival>=0.28",
        "lifelines>=0.27",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.12",
    ],
    # SimpleITK: tests re-run the authors' SimpleITK preprocessing to check patch conventions
    extras_require={"dev": ["pytest>=7", "pytest-benchmark>=4", "ruff>=0.6", "SimpleITK>=2.2"]},
    entry_points={"console_scripts": ["drasclr=drasclr.cli:main"]},
)
