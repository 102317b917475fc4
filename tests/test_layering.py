"""Layering: drasclr.kernels sits below drasclr.nn (no import cycle between them), and the
helpers both need live in drasclr.conv_common, below both."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (lazy imports too)."""
    package = "drasclr.kernels" if path.parent.name == "kernels" else "drasclr"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


@pytest.mark.parametrize("path",
                         sorted((ROOT / "kernels").glob("*.py")) + [ROOT / "drasclr" / "conv_common.py"],
                         ids=lambda p: p.name)
def test_lower_layers_never_import_nn(path):
    bad = sorted(name for name in imported_modules(path) if name.startswith("drasclr.nn"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_conv_common_imports_neither_layer():
    bad = sorted(name for name in imported_modules(ROOT / "drasclr" / "conv_common.py")
                 if name.startswith(("drasclr.nn", "drasclr.kernels")))
    assert not bad


def test_the_ast_check_sees_an_nn_import(tmp_path):
    """The check above would catch a lazy, function-level import of drasclr.nn."""
    (tmp_path / "kernels").mkdir()
    sample = tmp_path / "kernels" / "sample.py"
    sample.write_text("def f():\n    from drasclr.nn.loc_cond_conv import BACKENDS\n    return BACKENDS\n")
    assert "drasclr.nn.loc_cond_conv" in imported_modules(sample)


def test_kernels_import_without_nn():
    code = ("import sys, drasclr.kernels, drasclr.kernels.loc_cond_conv3d; "
            "loaded = sorted(m for m in sys.modules if m.startswith('drasclr.nn')); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_checkpoint_formats_sit_below_their_users():
    """drasclr.checkpoint_formats reads every checkpoint kind; training's checkpoints build on
    it, never the reverse (no import cycle)."""
    bad = sorted(name for name in imported_modules(ROOT / "drasclr" / "checkpoint_formats.py")
                 if name.startswith(("drasclr.pretrain", "drasclr.features", "drasclr.evaluation")))
    assert not bad
    assert "drasclr.checkpoint_formats" in imported_modules(ROOT / "drasclr" / "pretrain" / "checkpoints.py")
