"""The model registry: each kind's spec builds its module, feeds it and names its shape fields."""

import jax
import jax.numpy as jnp
import pytest
from test_models import tiny_config

from diffusion_jax.checkpoints import abstract_params
from diffusion_jax.models import MODEL_SPECS, model_spec, validate_model_config
from diffusion_jax.sampling.inputs import check_model_matches


def tiny(kind, **fields):
    return tiny_config(**{"kind": kind, "num_classes": 10, "num_head_channels": 16, **fields})


@pytest.mark.parametrize("kind", sorted(MODEL_SPECS))
def test_example_inputs_run_through_the_module(kind):
    settings = validate_model_config(tiny(kind))
    spec = model_spec(kind)
    module = spec.build(settings)
    assert isinstance(module, spec.module)
    args, kwargs = spec.example_inputs(settings, batch=2, abstract=False)
    assert ("low_res" in kwargs) == spec.takes_low_res and ("y" in kwargs) == spec.takes_labels
    out = jax.eval_shape(
        lambda: module.apply(module.init(jax.random.key(0), *args, **kwargs), *args, **kwargs)
    )
    want = (2, 10) if spec.trainer == "classifier" else (2, 16, 16, 6)  # learn_sigma
    assert out.shape == want and out.dtype == jnp.float32


# Config changes and whether they can change a parameter's shape.
CHANGES = {
    "num_channels": 64,
    "num_res_blocks": 2,
    "channel_mult": (1, 1),
    "attention_resolutions": (16,),
    "num_classes": 5,
    "learn_sigma": False,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "pool": "adaptive",
    "in_channels": 1,
    "dropout": 0.1,
}


def _shapes(cfg):
    return jax.tree.map(lambda a: a.shape, abstract_params(cfg))


@pytest.mark.parametrize("kind", sorted(MODEL_SPECS))
def test_every_field_that_shapes_the_parameters_is_one_a_checkpoint_must_match(kind):
    """Independent of the spec's list: the converter's abstract params decide."""
    saved = tiny(kind)
    want = _shapes(saved)
    for field, value in CHANGES.items():
        changed = tiny(kind, **{field: value})
        if _shapes(changed) != want:
            with pytest.raises(ValueError, match=f"model.{field}="):
                check_model_matches(saved, changed, "--checkpoint")
    check_model_matches(saved, tiny(kind, dropout=0.3), "--checkpoint")  # no shape: accepted
