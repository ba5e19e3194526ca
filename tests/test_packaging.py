"""`pip install -e .` / `pip install .`: the package, its launchers and configs, its deps.

Builds from a copy of the packaging inputs (so no build files land in the checkout),
offline (`--no-index --no-build-isolation`), then runs a launcher from the installed
wheel in a directory outside the repository.
"""

import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion_jax", "configs", "launch")


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("pkg") / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_editable_install_builds(source):
    result = _pip(
        "install", "--dry-run", "--no-deps", "--no-build-isolation", "--no-index", "-e", ".",
        cwd=source,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Would install diffusion_jax-0.1.0" in result.stdout


def test_wheel_holds_every_module_and_the_runtime_requirements(source, tmp_path):
    result = _pip(
        "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path), ".",
        cwd=source,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("diffusion_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        message = email.parser.Parser().parsestr(z.read(metadata).decode())
    for package in PACKAGES:
        for module in (REPO / package).rglob("*.py"):
            assert module.relative_to(REPO).as_posix() in names
    # The install pulls exactly requirements.txt (no torch: not a runtime dependency).
    required = {str(Requirement(r)) for r in message.get_all("Requires-Dist")}
    assert required == {str(Requirement(r)) for r in _requirement_lines(REPO / "requirements.txt")}
    assert not any(Requirement(r).name == "torch" for r in required)

    # Installed, the launchers and configs run from any directory.
    site = tmp_path / "site"
    result = _pip(
        "install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = [
        sys.executable, "-m", "launch.convert_checkpoint",
        f"--config={site / 'configs' / 'imagenet64.py'}:tinny", "--torch_checkpoint=x.pt",
        "--output=out",
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(
        command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1, run.stderr[-3000:]
    (line,) = run.stderr.strip().splitlines()  # the config loaded and refused its variant
    assert line.startswith(f"error: --config={site / 'configs' / 'imagenet64.py'}:tinny: ")
    assert "unknown config variant 'tinny'" in line
