"""The paper configs: hyperparameters, launch commands, variants, overrides."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import create_classifier, create_model

PAPER = [
    "imagenet64",
    "imagenet128",
    "imagenet256",
    "imagenet256_uncond",
    "imagenet512",
    "lsun_bedroom",
    "lsun_cat",
    "lsun_horse",
    "upsample64_256",
    "upsample128_512",
    "classifier64",
    "classifier128",
    "classifier256",
    "classifier512",
]
ALL = [*PAPER, "quickstart"]


def load(name):
    return importlib.import_module(f"configs.{name}")


@pytest.mark.parametrize("name", ALL)
def test_config_is_consistent_and_documents_its_launch_command(name):
    module = load(name)
    config = module.get_config()
    assert config.model.image_size == config.data.image_size
    launcher = "launch.train_classifier" if name.startswith("classifier") else "launch.train"
    assert f"python -m {launcher} --config=configs/{name}.py --workdir=" in module.__doc__
    if config.model.kind != "classifier":
        assert config.model.learn_sigma == config.diffusion.learn_sigma
        assert (config.model.num_classes is not None) == config.data.class_cond
    for field in ("attention_resolutions", "channel_mult", "ema_rates"):
        value = config.model.get(field, config.training.get(field))
        assert isinstance(value, tuple), f"{name}: {field} must be a tuple"
    if name in PAPER:
        assert "--torch_checkpoint=" in module.__doc__  # the released-checkpoint recipe


# (image size, channels, depth, heads, head channels, new order, dropout, classes, batch,
#  lr, iterations, noise schedule): the paper code's README flags and the appendix tables.
EXPECTED = {
    "imagenet64": (64, 192, 3, None, 64, True, 0.1, 1000, 2048, 3e-4, 540_000, "cosine"),
    "imagenet128": (128, 256, 2, 4, -1, False, 0.0, 1000, 256, 1e-4, 4_360_000, "linear"),
    "imagenet256": (256, 256, 2, None, 64, False, 0.0, 1000, 256, 1e-4, 1_980_000, "linear"),
    "imagenet512": (512, 256, 2, None, 64, False, 0.0, 1000, 256, 1e-4, 1_940_000, "linear"),
    "lsun_bedroom": (256, 256, 2, None, 64, False, 0.1, None, 256, 1e-4, 500_000, "linear"),
    "upsample64_256": (256, 192, 2, 4, -1, False, 0.0, 1000, 256, 1e-4, 500_000, "linear"),
    "upsample128_512": (512, 192, 2, None, 64, False, 0.0, 1000, 256, 1e-4, 1_050_000, "linear"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_hyperparameters(name):
    config = load(name).get_config()
    size, ch, depth, heads, head_ch, new, drop, classes, batch, lr, iters, sched = EXPECTED[name]
    m = config.model
    assert (m.image_size, m.num_channels, m.num_res_blocks) == (size, ch, depth)
    assert m.num_head_channels == head_ch
    if heads is not None:
        assert m.num_heads == heads
    assert (m.use_new_attention_order, m.dropout, m.num_classes) == (new, drop, classes)
    assert m.use_scale_shift_norm and m.resblock_updown and m.learn_sigma
    assert (config.training.batch_size, config.optim.lr) == (batch, lr)
    assert config.training.num_steps == iters
    assert config.training.ema_rates == (0.9999,)
    assert config.diffusion.noise_schedule == sched and config.diffusion.steps == 1000


@pytest.mark.parametrize(
    "name, method, steps, scale",
    [
        ("imagenet64", "ancestral", 250, 0.0),
        ("imagenet128", "ancestral", 250, 0.5),
        ("imagenet256", "ancestral", 250, 1.0),
        ("imagenet512", "ancestral", 250, 4.0),
        ("lsun_cat", "ancestral", 1000, 0.0),
    ],
)
def test_fid_table_sampling_rows(name, method, steps, scale):
    s = load(name).get_config().sampling
    assert (s.method, s.timestep_respacing, s.classifier_scale) == (method, steps, scale)
    if scale:
        assert s.classifier_config == f"configs/classifier{name[len('imagenet') :]}.py"


def test_named_sampling_variants():
    s = load("imagenet128").get_config("ddim25").sampling
    assert (s.method, s.timestep_respacing, s.classifier_scale) == ("ddim", 25, 1.25)
    s = load("imagenet256").get_config("ddim25").sampling
    assert (s.method, s.timestep_respacing, s.classifier_scale) == ("ddim", 25, 2.5)
    s = load("imagenet64").get_config("guided").sampling
    assert (s.classifier_scale, s.classifier_config) == (1.0, "configs/classifier64.py")
    with pytest.raises(ValueError, match="unknown config variant"):
        load("imagenet64").get_config("huge")


def test_classifier_configs_follow_the_paper():
    for size, depth in ((64, 4), (128, 2), (256, 2), (512, 2)):
        m = load(f"classifier{size}").get_config().model
        assert (m.kind, m.num_channels, m.num_res_blocks, m.pool) == (
            "classifier", 128, depth, "attention",
        )  # fmt: skip
        assert (m.num_head_channels, m.attention_resolutions, m.num_classes) == (
            64, (32, 16, 8), 1000,
        )  # fmt: skip
        config = load(f"classifier{size}").get_config()
        # The paper code's classifier training anneals the lr to 0 and keeps no EMA.
        assert config.optim.anneal_lr and config.training.ema_rates == ()


@pytest.mark.parametrize("name", PAPER)
def test_tiny_variant_is_small_and_builds(name):
    config = load(name).get_config("tiny")
    m = config.model
    assert m.image_size == config.data.image_size <= 32
    module = create_classifier(m) if m.kind == "classifier" else create_model(m)
    size = m.image_size
    kwargs = {}
    if m.kind != "classifier" and m.num_classes is not None:
        kwargs["y"] = jax.ShapeDtypeStruct((2,), jnp.int32)
    if m.kind == "superres":
        low = config.data.low_res_size
        assert 0 < low < size
        kwargs["low_res"] = jax.ShapeDtypeStruct((2, low, low, 3), jnp.float32)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    params = jax.eval_shape(
        lambda x, t, kw: module.init(jax.random.key(0), x, t, **kw), x, t, kwargs
    )
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) < 5_000_000


def test_quickstart_runs_a_forward_pass_on_cpu():
    config = load("quickstart").get_config()
    assert (config.data.dataset, config.data.image_size) == ("mnist_5k", 16)
    assert config.model.num_classes == 10 and config.data.class_cond
    module = create_model(config.model)
    x = jnp.zeros((2, 16, 16, 3), jnp.float32)
    t = jnp.array([0, 999], jnp.int32)
    y = jnp.array([3, 7], jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, t, y=y)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), shapes)
    out = jax.jit(module.apply)(variables, x, t, y=y)
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0
    n = sum(p.size for p in jax.tree.leaves(variables))
    assert n < 5_000_000
