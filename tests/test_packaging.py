"""The wheel runs on its own: built from the checkout's tracked files, installed into a fresh venv, `cqil` finds
its configs (conf/ shipped as the package's resource) with the working directory outside any checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tracked_copy(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files under dest (the build leaves nothing in the checkout)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the files a wheel is built from")
    src = tracked_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    # item 7 of issue 25: no setuptools warning about our packaging (undeclared data packages, license floor)
    assert "warning" not in build.stderr.lower(), build.stderr
    return next(out.glob("cqil-*.whl"))


def test_wheel_ships_every_config(wheel):
    with zipfile.ZipFile(wheel) as z:
        shipped = {n.removeprefix("cqil/") for n in z.namelist() if n.startswith("cqil/conf/")}
    wanted = {str(p.relative_to(REPO / "conf").as_posix()) for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped == {f"conf/{name}" for name in wanted}  # a new conf/ folder must be listed in pyproject.toml


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # the dependencies are this interpreter's (no network); the venv's own site-packages, holding the wheel, comes first
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CQIL_CONF")} | {"OMP_NUM_THREADS": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    cqil = str(venv / "bin" / "cqil")
    where = subprocess.run([str(python), "-c", "import cqil.cli; print(cqil.cli.__file__, cqil.cli.conf_dir())"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert where.count(str(venv)) == 2, where  # the installed code and its shipped configs, not the checkout's

    shown = subprocess.run([cqil, "convert", "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "plan" in shown.stdout, shown.stderr
    ran = subprocess.run([cqil, "latency", "calibrate=[]", "validate=[]"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert (work / "results" / "latency" / "hybrid.csv").is_file()
