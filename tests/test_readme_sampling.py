"""Every sampling command in the README names configs (and variants) that load, give valid
sampler options and job sizes on an 8-device host, and, when guided, a classifier config
of the same resolution (the commands run end to end on tiny variants in
test_sampling_e2e / test_sampling_job / test_fid_table)."""

import re
import shlex
from pathlib import Path

import pytest

from diffusion_jax.diffusion import SamplerOptions, create_diffusion
from diffusion_jax.sampling import inputs
from launch import common

README = Path(__file__).resolve().parents[1] / "README.md"


def sampling_commands():
    text = README.read_text()
    section = text.replace("\\\n", " ")
    commands = re.findall(r"python -m launch\.sample ([^`\n]+)", section)
    assert len(commands) >= 8
    return commands


@pytest.mark.parametrize("args", sampling_commands())
def test_readme_sampling_command_configs_are_valid(args):
    argv = shlex.split(args)
    spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    config, problem = common.load_config_file(str(README.parent / spec))
    assert problem is None, problem
    s = config.sampling
    SamplerOptions.from_config(s)
    inputs.check_num_samples(s.num_samples, s.batch_size, 8)
    create_diffusion(config.diffusion, timestep_respacing=s.timestep_respacing)
    if s.classifier_scale:
        assert (
            any(a.startswith("--classifier_checkpoint=") for a in argv) or s.classifier_checkpoint
        )
        classifier, problem = common.load_config_file(str(README.parent / s.classifier_config))
        assert problem is None, problem
        assert classifier.model.kind == "classifier"
        assert classifier.model.image_size == config.model.image_size
    if config.model.kind == "superres":
        assert any(a.startswith("--base_samples=") for a in argv)
