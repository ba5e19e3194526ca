"""Flax networks: exact paper parameter counts, remat, bf16, dropout, config checks."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from diffusion_jax.models import (
    GroupNorm32,
    create_classifier,
    create_model,
    model_spec,
    validate_model_config,
)

# Parameter counts of the paper code's own models (shared/ANCHORS.md).
PAPER_PARAMS = {
    "imagenet64": 295_904_454,
    "imagenet128": 421_529_606,
    "imagenet256": 553_838_086,
    "imagenet256_uncond": 552_814_086,
    "imagenet512": 558_997_638,
    "lsun_bedroom": 552_814_086,
    "lsun_cat": 552_814_086,
    "lsun_horse": 552_814_086,
    "upsample64_256": 311_795_910,
    "upsample128_512": 308_835_270,
    "classifier64": 65_438_568,
    "classifier128": 42_568_040,
    "classifier256": 54_096_360,
    "classifier512": 54_448_360,
}


def build(model_config):
    settings = validate_model_config(model_config)
    return model_spec(settings["kind"]).build(settings)


def example_inputs(model_config, low_res_size=None, batch=1, abstract=True):
    settings = validate_model_config(model_config)
    return model_spec(settings["kind"]).example_inputs(settings, batch, low_res_size, abstract)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_equals_paper_code(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    module = build(config.model)
    args, kwargs = example_inputs(config.model, config.data.low_res_size)
    variables = jax.eval_shape(lambda a, k: module.init(jax.random.key(0), *a, **k), args, kwargs)
    leaves = jax.tree.leaves(variables)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == PAPER_PARAMS[name]


def tiny_config(**fields):
    cfg = base.get_base_config().model
    cfg.update(
        dict(
            image_size=16,
            num_channels=32,
            num_res_blocks=1,
            channel_mult=(1, 2),
            attention_resolutions=(8,),
            num_heads=2,
            resblock_updown=True,
            learn_sigma=True,
        )
    )
    cfg.update(fields)
    return cfg


def random_variables(module, *args, seed=0):
    """Random values for every parameter, shapes from `jax.eval_shape` (no init compile).

    Random rather than initial values: the zero-initialised output layers hide effects.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), shapes)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(dropout=0.3)
    module = create_model(cfg)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), jnp.float32, -1, 1)
    t = jnp.array([3, 900], jnp.int32)
    variables = random_variables(module, x, t)
    return cfg, module, variables, x, t


def test_remat_gives_the_same_outputs_and_gradients(tiny):
    cfg, module, variables, x, t = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.remat = True
    remat_module = create_model(cfg)

    def loss(m, v):
        out = m.apply(v, x, t, train=True, rngs={"dropout": jax.random.key(5)})
        return jnp.sum(out**2)

    plain_val, plain_grad = jax.jit(jax.value_and_grad(lambda v: loss(module, v)))(variables)
    remat_val, remat_grad = jax.jit(jax.value_and_grad(lambda v: loss(remat_module, v)))(variables)
    np.testing.assert_allclose(remat_val, plain_val, rtol=1e-6)
    # Recomputation may reassociate float32 sums (some biases have a gradient that is zero
    # up to rounding), so compare against the scale of the whole gradient.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grad))
    for a, b in zip(jax.tree.leaves(remat_grad), jax.tree.leaves(plain_grad)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)


def test_dropout_only_in_training(tiny):
    _, module, variables, x, t = tiny
    apply = jax.jit(module.apply, static_argnames="train")
    eval_a = apply(variables, x, t)
    eval_b = apply(variables, x, t, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
    cfg, module, variables, x, t = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.dtype = "bfloat16"
    bf16 = create_model(cfg)
    params = jax.eval_shape(bf16.init, jax.random.key(0), x, t)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    got = jax.jit(bf16.apply)(variables, x, t)
    want = jax.jit(module.apply)(variables, x, t)
    assert got.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert 0 < err < 5e-2  # bf16 rounding is visible but small


def test_groupnorm_computes_in_float32():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64), jnp.float32) * 30 + 100
    norm = GroupNorm32()
    params = norm.init(jax.random.key(1), x)
    out32 = norm.apply(params, x)
    out16 = norm.apply(params, x.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    # Closed form: each group of 2 channels over 4x4 positions has mean 0 and var 1.
    grouped = np.asarray(out32).reshape(2, 16, 32, 2)
    np.testing.assert_allclose(grouped.mean(axis=(1, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(grouped.var(axis=(1, 3)), 1, atol=1e-3)
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=0.05)


def test_class_conditional_model_requires_labels():
    cfg = tiny_config(num_classes=10)
    module = create_model(cfg)
    args, _ = example_inputs(cfg, abstract=False)
    with pytest.raises(ValueError, match="class-conditional"):
        jax.eval_shape(module.init, jax.random.key(0), *args)
    uncond = create_model(tiny_config())
    with pytest.raises(ValueError, match="class-conditional"):
        jax.eval_shape(uncond.init, jax.random.key(0), *args, y=jnp.zeros((1,), jnp.int32))


def test_superres_requires_low_res():
    cfg = tiny_config(kind="superres")
    module = create_model(cfg)
    args, _ = example_inputs(cfg, abstract=False)
    with pytest.raises(ValueError, match="low_res"):
        jax.eval_shape(module.init, jax.random.key(0), *args)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(attention_resolutions=(7,)), "attention_resolutions"),
        (dict(num_channels=48), "multiple of 32"),
        (dict(kind="transformer"), r"model\.kind"),
        (dict(image_size=48, channel_mult=()), "channel_mult"),
        (dict(dtype="float8"), r"model\.dtype"),
        (dict(image_size=12, channel_mult=(1, 2, 2, 2)), "halved"),
    ],
)
def test_bad_model_config_is_refused_with_the_field_name(fields, match):
    with pytest.raises(ValueError, match=match):
        create_model(tiny_config(**fields))


def test_classifier_config_checks():
    with pytest.raises(ValueError, match="create_classifier"):
        create_model(tiny_config(kind="classifier", num_classes=10, num_head_channels=32))
    with pytest.raises(ValueError, match=r"model\.pool"):
        create_classifier(tiny_config(kind="classifier", num_classes=10, pool="max"))
    create_classifier(tiny_config(kind="classifier", num_classes=10, num_head_channels=32))
    with pytest.raises(ValueError, match="num_classes"):
        create_classifier(tiny_config(kind="classifier", num_head_channels=32))
    with pytest.raises(ValueError, match="num_head_channels"):
        create_classifier(tiny_config(kind="classifier", num_classes=10, pool="attention"))


def test_classifier_remat_gives_the_same_logits():
    fields = dict(kind="classifier", num_classes=10, num_head_channels=32)
    plain = create_classifier(tiny_config(**fields))
    remat = create_classifier(tiny_config(remat=True, **fields))
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), jnp.float32, -1, 1)
    t = jnp.array([3, 900], jnp.int32)
    variables = random_variables(plain, x, t)
    remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), x, t)
    assert jax.tree.structure(remat_shapes) == jax.tree.structure(variables)
    np.testing.assert_allclose(
        jax.jit(remat.apply)(variables, x, t), jax.jit(plain.apply)(variables, x, t), rtol=1e-6
    )


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    from diffusion_jax.models import resolve_compute_dtype

    assert resolve_compute_dtype("auto", backend="gpu") == jnp.bfloat16
    assert resolve_compute_dtype("auto", backend="tpu") == jnp.bfloat16
    assert resolve_compute_dtype("auto", backend="cpu") == jnp.float32
    assert resolve_compute_dtype("bfloat16", backend="cpu") == jnp.bfloat16
    # The suite runs on CPU: an 'auto' model computes in float32 here.
    assert create_model(tiny_config(dtype="auto")).dtype == jnp.float32


def test_apply_takes_params_tree_or_variables_and_checks_labels():
    cfg = tiny_config(num_classes=10)
    module = create_model(cfg)
    x, t = jnp.zeros((2, 16, 16, 3), jnp.float32), jnp.array([1, 500])
    y = jnp.array([3, 9])
    params = module.init(jax.random.key(0), x, t, y=y)["params"]
    np.testing.assert_array_equal(
        module.apply(params, x, t, y=y), module.apply({"params": params}, x, t, y=y)
    )
    with pytest.raises(ValueError, match=r"y must have shape \[B\] = \(2,\)"):
        module.apply(params, x, t, y=jnp.array([1, 2, 3]))
    for bad in ([3, 10], [-1, 2]):  # would index the embedding table silently
        with pytest.raises(ValueError, match="num_classes=10"):
            module.apply(params, x, t, y=jnp.array(bad))


def test_create_classifier_refuses_a_diffusion_config():
    with pytest.raises(ValueError, match="create_classifier needs a classifier config"):
        create_classifier(tiny_config())
