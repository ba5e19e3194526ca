"""Every training command in the README names a config that loads and passes the launch
checks on an 8-device host (the commands themselves run end to end on tiny variants in
test_training_e2e / test_training_learning / test_training_features)."""

import ast
import contextlib
import re
import shlex
from pathlib import Path

import pytest

from diffusion_jax.training import checks
from launch import common

README = Path(__file__).resolve().parents[1] / "README.md"


def training_commands():
    text = README.read_text()
    section = text.replace("\\\n", " ")
    commands = re.findall(r"python -m (launch\.train(?:_classifier)?) ([^`\n\"]+)", section)
    assert len(commands) >= 6
    return commands


@pytest.mark.parametrize(("launcher", "args"), training_commands())
def test_readme_training_command_configs_pass_the_checks(launcher, args):
    argv = shlex.split(args)
    spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    config, problem = common.load_config_file(str(README.parent / spec))
    assert problem is None, problem
    for arg in argv:
        if arg.startswith("--config."):
            key, value = arg[len("--config.") :].split("=", 1)
            section, field = key.split(".")
            with contextlib.suppress(ValueError, SyntaxError):  # else a plain string
                value = ast.literal_eval(value)
            config[section][field] = value
    config.training.init_from = ""  # the released checkpoint is not here
    trainer = "classifier" if launcher.endswith("classifier") else "diffusion"
    checks.check_training_config(config, trainer, 8)
