"""Both install modes ship every subpackage (`graph`, `math`, `ops`, `passes`, `stages`, `cli`), and a plain checkout
on `sys.path` imports the whole package without installing."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_ships_passes(tmp_path, editable):
    for directory in site.getsitepackages():
        if (Path(directory) / "onnx_lowrank" / "__init__.py").exists():
            pytest.skip("a regular install in the system site-packages would shadow the one under test")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    command = [str(python), "-m", "pip", "install", "--quiet", "--no-deps"] + (["-e"] if editable else []) + [str(ROOT)]
    subprocess.run(command, check=True, cwd=tmp_path)
    # dependencies come from this interpreter's site-packages; PYTHONPATH does not run their .pth files, so the
    # editable install of the surrounding environment cannot answer for the venv's own install
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    probe = (
        "import onnx_lowrank, onnx_lowrank.passes as p; "
        "print(p.__file__); print(callable(p.factorize_layers)); print(onnx_lowrank.compress.__name__)"
    )
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    location, is_callable, name = result.stdout.split()
    assert is_callable == "True" and name == "compress"
    if editable:
        assert Path(location) == ROOT / "onnx_lowrank" / "passes" / "__init__.py"
    else:
        assert Path(location).is_relative_to(venv)
        assert Path(location).parent.name == "passes" and Path(location).parent.parent.name == "onnx_lowrank"


def test_a_checkout_imports_without_installing(tmp_path):
    """`passes/` lives inside the package: a copy of the checkout on sys.path imports every subpackage from itself
    (the installed package's path mapping never answers for it)."""
    import shutil

    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "onnx_lowrank", checkout / "onnx_lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import onnx_lowrank.passes as p, onnx_lowrank.cli.main as m; "
             "print(p.__file__); print(m.__file__)")
    result = subprocess.run([sys.executable, "-c", probe, str(checkout)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert all(Path(line).is_relative_to(checkout) for line in result.stdout.split())
