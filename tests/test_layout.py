"""The floors of the library: a module imports only from its own floor or below.

0: diffusion, models, parallel, files, locks, resumable, aot, progress (the math, the networks,
   the mesh, file I/O, the resumable-job layer, ahead-of-time compiles, rate and ETA lines)
1: data, checkpoints, evaluation
2: sampling, training (training may use the sampling engine, not the reverse)
3: jobs, quickstart (jobs that compose the library)
An upward import fails this test, naming the file and the import (README: Layout).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_jax"
FLOOR = {
    "diffusion": 0, "models": 0, "parallel": 0, "files": 0, "locks": 0, "resumable": 0, "aot": 0,
    "progress": 0,
    "data": 1, "checkpoints": 1, "evaluation": 1,
    "sampling": 2, "training": 2.5,
    "jobs": 3, "quickstart": 3,
}  # fmt: skip


def _unit(path: Path, package: Path) -> str:
    return path.relative_to(package).with_suffix("").parts[0]


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("diffusion_jax")
        ):
            parts = node.module.split(".")
            if len(parts) > 1:
                yield node.lineno, parts[1]
            else:  # from diffusion_jax import x, y
                yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "diffusion_jax" and len(parts) > 1:
                    yield node.lineno, parts[1]


def upward_imports(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        if path.parent == package and path.name == "__init__.py":
            continue  # the package's own __init__ re-exports nothing upward-dependent
        unit = _unit(path, package)
        assert unit in FLOOR, f"{path}: unit {unit!r} has no floor; add it to FLOOR and README"
        for lineno, target in _imports(ast.parse(path.read_text())):
            if target in FLOOR and target != unit and FLOOR[target] > FLOOR[unit]:
                bad.append(f"{path.relative_to(package.parent)}:{lineno} imports {target}")
    return bad


def test_no_module_imports_from_a_floor_above_its_own():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "diffusion_jax"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "unet.py").write_text("from diffusion_jax.training import loop\n")
    (pkg / "sampling").mkdir()
    (pkg / "sampling" / "job.py").write_text("from diffusion_jax import models, training\n")
    (pkg / "training").mkdir()
    (pkg / "training" / "loop.py").write_text("import diffusion_jax.sampling.job\n")
    assert upward_imports(pkg) == [
        "diffusion_jax/models/unet.py:1 imports training",
        "diffusion_jax/sampling/job.py:1 imports training",
    ]
