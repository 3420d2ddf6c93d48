"""A non-editable install (a wheel) holds every package of the source tree and runs `braze demo`
from outside the checkout: the editable install the tests otherwise use maps folders straight
to the tree, so it cannot see a package that pyproject.toml leaves out of the wheel."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    """Every folder holding Python files under the package-dir mapping, as a dotted name."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = set()
    for pkg, folder in mapping.items():
        base = ROOT / folder
        for d in [base, *(p for p in base.rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            out.add(".".join([pkg, *d.relative_to(base).parts]))
    return out


def test_wheel_installs_every_package_and_runs_the_demo(tmp_path):
    # build from a copy: setuptools writes build/ and *.egg-info into the source tree
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info",
                                                            "__pycache__", ".*"))
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(wheels), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = wheels.glob("braze-*.whl")
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {str(Path(n).parent).replace("/", ".") for n in z.namelist() if n.endswith(".py")}
    missing = _source_packages() - in_wheel
    assert not missing, f"pyproject.toml leaves these packages out of the wheel: {sorted(missing)}"

    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--target", str(target), str(wheel)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # -S: no .pth files, so the editable install's import hook cannot supply a missing package;
    # the dependencies come from site-packages as plain path entries
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), *site.getsitepackages()]))
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run([sys.executable, "-S", "-c", "import braze.codegen.kernels as k; print(k.__file__)"],
                       cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith(str(target)), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-S", "-m", "braze", "demo"], cwd=run, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical greedy tokens" in r.stdout
    assert "braze inspect /" not in r.stdout      # the temporary artifact is gone by now
