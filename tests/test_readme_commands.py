"""The README's commands cannot drift from the code.

Every `python -m launch.<name> ...` in the README is parsed: the launcher exists, every
flag it passes is one that launcher (or the multi-process flags it uses) defines, its
`--config=` loads and every `--config.<field>=` override names a real field and takes
the value. Every launcher the README names has end-to-end tests on tiny configs that
run it (the registry below; each entry must exist and name the launcher). The training
and sampling commands' configs are also checked against the launch checks in
test_readme_training.py / test_readme_sampling.py.
"""

import ast
import contextlib
import re
import shlex
from pathlib import Path

import pytest

from launch import common

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_DEFINE = r"(?:DEFINE_\w+|define_list)\(\s*[\"'](\w+)[\"']"
_ABSL_FLAGS = {"verbosity", "v", "logtostderr", "alsologtostderr", "helpfull", "help"}

# launcher -> tests that run it end to end on tiny configs (file::function).
END_TO_END = {
    "quickstart": ["test_quickstart.py::test_quickstart_trains_guides_and_reports"],
    "train": [
        "test_training_e2e.py::test_killed_and_preempted_run_resumes_bit_for_bit",
        "test_training_e2e.py::test_two_processes_equal_one",
    ],
    "train_classifier": [
        "test_training_learning.py::test_classifier_learns_mnist_through_the_launcher"
    ],
    "sample": [
        "test_sampling_e2e.py::test_killed_and_restarted_job_equals_uninterrupted",
        "test_sampling_e2e.py::test_two_processes_of_four_devices_equal_one_of_eight",
    ],
    "convert_checkpoint": ["test_checkpoints.py::test_convert_checkpoint_launcher_end_to_end"],
    "evaluate": ["test_evaluation_launchers.py::test_evaluate_prints_reference_lines_and_caches"],
    "make_reference": ["test_evaluation_launchers.py::test_make_reference_writes_paper_format"],
    "sweep": ["test_sweep.py::test_grid_table_matches_the_evaluator_run_separately"],
    "fid_table": ["test_fid_table.py::test_two_row_table_matches_the_evaluator_run_separately"],
    "plan": ["test_plan.py::test_launcher_prints_the_variants_that_fit_and_the_cost"],
    # Real datasets need the network or manual archives: the launcher's error paths and
    # the conversion it runs are tested on local data.
    "prepare_data": [
        "test_launcher_errors.py::test_bad_input_is_one_error_line",
        "test_data_prepare.py::test_converted_data_reads_as_the_tfrecord_did",
    ],
}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(launcher, argv) of every `python -m launch.<name>` in the README."""
    text = README.read_text().replace("\\\n", " ")
    found = []
    for match in re.finditer(r"python -m launch\.(\w+)((?:[ \t]+[^ \t\n`|\"]+)*)", text):
        # `[--flag=VALUE]` marks an optional flag.
        args = [a.strip("[]") for a in shlex.split(match.group(2)) if a not in ("&&",)]
        cut = next((i for i, a in enumerate(args) if a in ("#", ";") or a.startswith("(")), None)
        found.append((match.group(1), args[:cut]))
    return found


def _defined_flags(launcher: str) -> set[str]:
    source = (ROOT / "launch" / f"{launcher}.py").read_text()
    names = set(re.findall(_DEFINE, source))
    if "define_config_flag(" in source:
        names |= set(re.findall(r"define_config_flag\([^)]*name=[\"'](\w+)", source)) or {"config"}
    if "distributed" in source:
        names |= set(re.findall(_DEFINE, (ROOT / "launch" / "distributed.py").read_text()))
    if "run(argv" in source and launcher != "train":  # reuses launch.train's flags
        names |= _defined_flags("train")
    return names | _ABSL_FLAGS


def test_the_readme_has_the_commands_a_newcomer_needs():
    launchers = {name for name, _ in readme_commands()}
    assert set(END_TO_END) <= launchers, set(END_TO_END) - launchers


@pytest.mark.parametrize(("launcher", "argv"), readme_commands(), ids=lambda v: str(v)[:60])
def test_readme_command_parses(launcher, argv):
    assert (ROOT / "launch" / f"{launcher}.py").exists(), f"no launch/{launcher}.py"
    defined = _defined_flags(launcher)
    config = None
    for arg in argv:
        if not arg.startswith("-"):
            if launcher == "evaluate":  # REF.npz SAMPLES.npz are positional
                continue
            pytest.fail(f"launch.{launcher}: unexpected positional argument {arg!r}")
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("config."):
            continue
        assert name in defined or name.removeprefix("no") in defined, (
            f"launch.{launcher} has no flag --{name}"
        )
        if name == "config":
            spec = arg.split("=", 1)[1]
            config, problem = common.load_config_file(str(ROOT / spec))
            assert problem is None, problem
    if config is None and "config" in defined and launcher == "quickstart":
        config, _ = common.load_config_file(str(ROOT / "configs" / "quickstart.py"))
    for arg in argv:
        if arg.startswith("--config."):
            assert config is not None, f"{arg} without a config"
            key, value = arg[len("--config.") :].split("=", 1)
            *path, field = key.split(".")
            node = config
            for part in path:
                assert part in node, f"{arg}: no section {part}"
                node = node[part]
            assert field in node, f"{arg}: no field {field} in {'.'.join(path)}"
            with contextlib.suppress(ValueError, SyntaxError):  # else a plain string
                value = ast.literal_eval(value)
            node[field] = value  # raises on a type the field cannot take


@pytest.mark.parametrize("launcher", sorted(END_TO_END))
def test_every_readme_launcher_has_end_to_end_tests(launcher):
    for entry in END_TO_END[launcher]:
        file, function = entry.split("::")
        source = (ROOT / "tests" / file).read_text()
        tree = ast.parse(source)
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert function in names, f"tests/{file} has no {function}"
        assert f"launch.{launcher}" in source or f"launch import {launcher}" in source, (
            f"tests/{file} never runs launch.{launcher}"
        )
