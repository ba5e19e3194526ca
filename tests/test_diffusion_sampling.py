"""Sampling loops: parity with the paper code's loops, one compile per shape, guidance.

Loops run as one compiled lax.scan; the reference runs its Python loop in torch
float64 (with its float32 table lookup patched to float64 unless stated), and the
float64 parity tests run ours in float64 too (the `x64` fixture). The other tests run
in the suite's float32 default, as users run the loops.
"""

import _diffusion_reference as ref_lib
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as ours

torch = pytest.importorskip("torch")
pytest.importorskip("guided_diffusion")

SHAPE = (2, 4, 4, 3)  # [B, H, W, C]
LABELS = np.array([2, 5])


def _max_rel(actual, expected):
    """max |a - e| / max |e|: relative error of the whole array."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _ref_loop(ref, loop, model, x_T, **kwargs):
    """The reference's progressive loop as NHWC arrays [T, B, H, W, C]."""
    gen = getattr(ref, f"{loop}_sample_loop_progressive")(
        model.torch,
        list(ref_lib.to_nchw(x_T).shape),
        noise=ref_lib.to_nchw(x_T),
        device="cpu",
        model_kwargs={"y": torch.from_numpy(LABELS)},
        **kwargs,
    )
    outs = list(gen)
    return (
        np.stack([ref_lib.to_nhwc(o["sample"]) for o in outs]),
        np.stack([ref_lib.to_nhwc(o["pred_xstart"]) for o in outs]),
    )


DDIM_CASES = {
    # The paper's setting: 1000-step cosine schedule, learned sigmas, DDIM with 25 steps.
    "cosine-ddim25-learned_range": dict(
        steps=1000, schedule="cosine", respacing="ddim25", var_type="learned_range"
    ),
    "linear-40-start_x-rescaled": dict(
        steps=40, schedule="linear", mean_type="start_x", rescale_timesteps=True
    ),
}


@pytest.fixture(scope="module")
def models():
    return {
        False: ref_lib.StandInModel(3, False, seed=7),
        True: ref_lib.StandInModel(3, True, seed=7),
    }


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", list(DDIM_CASES))
@pytest.mark.parametrize("guided", [False, True])
def test_ddim_loop_matches_paper_code_float64(case, guided, models):
    mine, ref = ref_lib.make_pair(**DDIM_CASES[case])
    model = models[mine.model_var_type.startswith("learned")]
    x_T = np.random.default_rng(0).standard_normal(SHAPE)
    cond = dict(cond_fn=ref_lib.gaussian_cond_fn) if guided else {}
    got = mine.ddim_sample_loop_progressive(
        model, SHAPE, None, noise=jnp.asarray(x_T), model_kwargs={"y": jnp.asarray(LABELS)}, **cond
    )
    ref_cond = dict(cond_fn=ref_lib.gaussian_cond_fn_torch) if guided else {}
    with ref_lib.float64_reference():
        want_samples, want_pred = _ref_loop(ref, "ddim", model, x_T, **ref_cond)
    assert got["samples"].shape == (mine.num_timesteps, *SHAPE)
    assert _max_rel(got["samples"], want_samples) < 1e-9
    assert _max_rel(got["pred_xstarts"], want_pred) < 1e-9
    np.testing.assert_array_equal(got["sample"], got["samples"][-1])
    # Against the unpatched reference (float32 table lookup), the 1e-5 bound.
    stock_samples, _ = _ref_loop(ref, "ddim", model, x_T, **ref_cond)
    assert _max_rel(got["sample"], stock_samples[-1]) < 1e-5
    if not guided:  # the plain loop is the same program minus the stacking
        plain = mine.ddim_sample_loop(
            model, SHAPE, None, noise=jnp.asarray(x_T), model_kwargs={"y": jnp.asarray(LABELS)}
        )
        np.testing.assert_allclose(plain, got["sample"], rtol=1e-12, atol=1e-12)


def test_ddim_loop_matches_paper_code_float32(models):
    mine, ref = ref_lib.make_pair(**DDIM_CASES["cosine-ddim25-learned_range"])
    x_T = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    got = mine.ddim_sample_loop(
        models[True],
        SHAPE,
        None,
        noise=jnp.asarray(x_T),
        cond_fn=ref_lib.gaussian_cond_fn,
        model_kwargs={"y": jnp.asarray(LABELS)},
    )
    assert got.dtype == jnp.float32
    want, _ = _ref_loop(ref, "ddim", models[True], x_T, cond_fn=ref_lib.gaussian_cond_fn_torch)
    assert want.dtype == np.float32
    assert _max_rel(got, want[-1]) < 1e-4


def _our_step_noises(rng, num_steps, dtype):
    """The documented randomness, written out with plain jax.random: sample i has key
    k_i = fold_in(rng, i) and its step noise at t is normal(fold_in(k_i, t), SHAPE[1:])."""
    sample_keys = [jax.random.fold_in(rng, i) for i in range(SHAPE[0])]
    return {
        t: np.stack(
            [
                np.asarray(jax.random.normal(jax.random.fold_in(k, t), SHAPE[1:], dtype))
                for k in sample_keys
            ]
        )
        for t in range(num_steps)
    }


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("loop", ["p", "ddim"])
@pytest.mark.parametrize("guided", [False, True])
def test_stochastic_loops_match_paper_code_given_the_same_noise(loop, guided, models):
    """Ancestral (Algorithm 1 when guided) and DDIM with eta=0.7 (Algorithm 2), with
    the reference fed the noise our loop draws at every step."""
    mine, ref = ref_lib.make_pair(
        steps=100,
        schedule="cosine",
        respacing="12,8",
        var_type="learned_range",
        rescale_timesteps=True,
    )
    model = models[True]
    rng = jax.random.key(3)
    x_T = np.random.default_rng(3).standard_normal(SHAPE)
    eta = dict(eta=0.7) if loop == "ddim" else {}
    cond = dict(cond_fn=ref_lib.gaussian_cond_fn) if guided else {}
    got = getattr(mine, f"{loop}_sample_loop")(
        model,
        SHAPE,
        rng,
        noise=jnp.asarray(x_T),
        model_kwargs={"y": jnp.asarray(LABELS)},
        **eta,
        **cond,
    )
    noises = _our_step_noises(rng, mine.num_timesteps, jnp.float64)
    scripted = [ref_lib.to_nchw(noises[t]) for t in reversed(range(mine.num_timesteps))]
    ref_cond = dict(cond_fn=ref_lib.gaussian_cond_fn_torch) if guided else {}
    with ref_lib.float64_reference(), ref_lib.scripted_randn_like(scripted) as left:
        want, _ = _ref_loop(ref, loop, model, x_T, **eta, **ref_cond)
    assert not left  # the reference consumed exactly one noise per step
    # The reference rounds the guided ancestral mean to float32 (`.float()`).
    tol = 1e-6 if guided and loop == "p" else 1e-9
    assert _max_rel(got, want[-1]) < tol
    # A different key gives a different sample; the same key the same one.
    other = getattr(mine, f"{loop}_sample_loop")(
        model,
        SHAPE,
        jax.random.key(4),
        noise=jnp.asarray(x_T),
        model_kwargs={"y": jnp.asarray(LABELS)},
        **eta,
        **cond,
    )
    assert _max_rel(other, got) > 1e-3


def _linear_classifier(params, x, t):
    # logits[b, k] = sum_hwc x[b] * W[k] + t[b] / 1000 * c[k]: its log-softmax gradient
    # has a closed form.
    return jnp.einsum("bhwc,khwc->bk", x, params["w"]) + (
        jnp.asarray(t).astype(x.dtype)[:, None] / 1000.0 * params["c"]
    )


def _classifier_params(dtype=np.float32):
    rng = np.random.default_rng(9)
    return {
        "w": jnp.asarray(0.3 * rng.standard_normal((6, 4, 4, 3)), dtype),
        "c": jnp.asarray(rng.standard_normal(6), dtype),
    }


@pytest.mark.usefixtures("x64")
def test_classifier_cond_fn_equals_hand_computed_gradient():
    params = _classifier_params(np.float64)
    x = jnp.asarray(np.random.default_rng(10).standard_normal(SHAPE))
    t = jnp.array([3, 17])
    cond_fn = ours.classifier_cond_fn(_linear_classifier, params, 2.5)
    got = cond_fn(x, t, jnp.asarray(LABELS), low_res=None)  # extra kwargs are ignored
    w = np.asarray(params["w"])
    logits = np.einsum("bhwc,khwc->bk", np.asarray(x), w) + np.asarray(t)[
        :, None
    ] / 1000.0 * np.asarray(params["c"])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    # d/dx log softmax(Wx)[y] = W[y] - sum_k p_k W[k]
    want = 2.5 * (w[LABELS] - np.einsum("bk,khwc->bhwc", probs, w))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert got.dtype == jnp.float64


@pytest.mark.usefixtures("x64")
def test_classifier_guided_ddim_matches_paper_code_with_torch_autograd(models):
    """Guided DDIM with `classifier_cond_fn` vs the paper script's autograd cond_fn."""
    mine, ref = ref_lib.make_pair(**DDIM_CASES["cosine-ddim25-learned_range"])
    params = _classifier_params(np.float64)
    scale = 4.0
    x_T = np.random.default_rng(11).standard_normal(SHAPE)
    got = mine.ddim_sample_loop(
        models[True],
        SHAPE,
        None,
        noise=jnp.asarray(x_T),
        cond_fn=ours.classifier_cond_fn(_linear_classifier, params, scale),
        model_kwargs={"y": jnp.asarray(LABELS)},
    )
    w_t = torch.from_numpy(np.array(params["w"])).permute(0, 3, 1, 2)  # [K, C, H, W]
    c_t = torch.from_numpy(np.array(params["c"]))

    def torch_cond_fn(x, t, y=None):  # as the paper's classifier_sample.py
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = (
                torch.einsum("bchw,kchw->bk", x_in, w_t) + t.to(x.dtype)[:, None] / 1000.0 * c_t
            )
            log_probs = torch.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    with ref_lib.float64_reference():
        want, _ = _ref_loop(ref, "ddim", models[True], x_T, cond_fn=torch_cond_fn)
    assert _max_rel(got, want[-1]) < 1e-9
    unguided = mine.ddim_sample_loop(
        models[True], SHAPE, None, noise=jnp.asarray(x_T), model_kwargs={"y": jnp.asarray(LABELS)}
    )
    assert _max_rel(unguided, got) > 1e-3  # guidance did something


@pytest.mark.usefixtures("x64")
def test_ddim_reverse_matches_paper_code(models):
    mine, ref = ref_lib.make_pair(
        steps=40, schedule="cosine", respacing="ddim10", var_type="learned_range"
    )
    x0 = np.random.default_rng(12).uniform(-1, 1, SHAPE)
    got = mine.ddim_reverse_sample_loop(
        models[True],
        jnp.asarray(x0),
        model_kwargs={"y": jnp.asarray(LABELS)},
        keep_intermediates=True,
    )
    x = ref_lib.to_nchw(x0)
    want = []
    with ref_lib.float64_reference():
        for t in range(mine.num_timesteps):
            x = ref.ddim_reverse_sample(
                models[True].torch,
                x,
                torch.full((SHAPE[0],), t),
                model_kwargs={"y": torch.from_numpy(LABELS)},
            )["sample"]
            want.append(ref_lib.to_nhwc(x))
    assert _max_rel(got["samples"], np.stack(want)) < 1e-9
    np.testing.assert_array_equal(got["sample"], got["samples"][-1])


# --- Compilation behaviour. ----------------------------------------------------------


def _counted_model(x, t, y=None):
    return jnp.tanh(0.5 * x + jnp.asarray(t).astype(x.dtype)[:, None, None, None] / 1000.0)


def _counted_apply(params, x, t, y=None):
    return jnp.tanh(params["a"] * x + jnp.asarray(t).astype(x.dtype)[:, None, None, None] / 1000.0)


def test_each_loop_compiles_once_per_shape():
    chex.clear_trace_counter()
    diff = ours.create_diffusion(steps=100, timestep_respacing="ddim10")
    model = chex.assert_max_traces(_counted_model, n=3)  # ddim, p, and one new shape
    for seed in range(3):
        diff.ddim_sample_loop(model, SHAPE, jax.random.key(seed))
    for seed in range(3):
        diff.p_sample_loop(model, SHAPE, jax.random.key(seed))
    diff.ddim_sample_loop(model, (1, 2, 2, 3), jax.random.key(0))  # a new shape: one trace
    with pytest.raises(AssertionError, match="traced > 3 times"):
        diff.ddim_sample_loop(model, (1, 2, 2, 2), jax.random.key(0))


def test_new_weights_and_guidance_scale_do_not_recompile():
    """Parameters inside a jax.tree_util.Partial are loop inputs, not constants."""
    chex.clear_trace_counter()
    diff = ours.create_diffusion(steps=100, timestep_respacing="ddim10")
    apply = chex.assert_max_traces(_counted_apply, n=1)
    classifier = chex.assert_max_traces(_linear_classifier, n=1)
    params = _classifier_params(np.float32)
    x_T = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)
    outs = []
    for a, scale in [(0.5, 1.0), (0.9, 1.0), (0.9, 3.0)]:
        model = jax.tree_util.Partial(apply, {"a": jnp.float32(a)})
        cond_fn = ours.classifier_cond_fn(classifier, params, scale)
        outs.append(
            diff.ddim_sample_loop(
                model,
                SHAPE,
                None,
                noise=x_T,
                cond_fn=cond_fn,
                model_kwargs={"y": jnp.asarray(LABELS)},
            )
        )
    assert _max_rel(outs[0], outs[1]) > 1e-3 and _max_rel(outs[1], outs[2]) > 1e-3
    # An equal diffusion from a second create_diffusion call reuses the same program
    # (apply and classifier would trace a second time otherwise).
    again = ours.create_diffusion(steps=100, timestep_respacing="ddim10")
    assert again == diff and hash(again) == hash(diff) and again is not diff
    model = jax.tree_util.Partial(apply, {"a": jnp.float32(0.9)})
    np.testing.assert_array_equal(
        again.ddim_sample_loop(
            model,
            SHAPE,
            None,
            noise=x_T,
            cond_fn=ours.classifier_cond_fn(classifier, params, 3.0),
            model_kwargs={"y": jnp.asarray(LABELS)},
        ),
        outs[2],
    )


def test_progress_bar_reports_every_step_and_changes_nothing(capsys):
    diff = ours.create_diffusion(steps=100, timestep_respacing="ddim10")
    x_T = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32)
    quiet = diff.ddim_sample_loop(_counted_model, SHAPE, None, noise=x_T)
    shown = diff.ddim_sample_loop(_counted_model, SHAPE, None, noise=x_T, progress=True)
    np.testing.assert_array_equal(quiet, shown)
    assert "10/10" in capsys.readouterr().err


# --- Per-sample randomness. -----------------------------------------------------------


def _labelled_model(x, t, y=None):
    # Per-example and label-dependent, so a sample mixed up with another one shows.
    shift = jnp.asarray(t).astype(x.dtype)[:, None, None, None] / 1000.0
    if y is not None:
        shift = shift + 0.1 * jnp.asarray(y).astype(x.dtype)[:, None, None, None]
    return jnp.tanh(0.5 * x + shift)


RANDOM_LOOPS = {
    "ancestral": ("p_sample_loop", {}),
    "ddim-eta0.5": ("ddim_sample_loop", {"eta": 0.5}),
    "ancestral-progressive": ("p_sample_loop_progressive", {}),
}


@pytest.mark.parametrize("case", list(RANDOM_LOOPS))
def test_a_sample_does_not_depend_on_its_batch(case):
    """Sample i of a batch drawn with one key equals the same sample drawn alone with
    its per-sample key fold_in(rng, i), x_T included; permuting a batch of per-sample
    keys permutes the samples."""
    method, extra = RANDOM_LOOPS[case]
    diff = ours.create_diffusion(steps=100, timestep_respacing="ddim10")
    loop = getattr(diff, method)

    def run(shape, rng, labels):
        out = loop(_labelled_model, shape, rng, model_kwargs={"y": jnp.asarray(labels)}, **extra)
        return np.asarray(out["sample"] if isinstance(out, dict) else out)

    shape = (4, 2, 2, 3)
    labels = np.array([3, 1, 4, 1])
    rng = jax.random.key(7)
    batch = run(shape, rng, labels)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2  # the samples differ from each other
    for i in range(shape[0]):
        alone = run((1, *shape[1:]), jax.random.fold_in(rng, i)[None], labels[i : i + 1])
        np.testing.assert_allclose(alone[0], batch[i], rtol=1e-6, atol=1e-6)
    # A batch of per-sample keys in another order (another batch composition).
    order = np.array([2, 0, 3, 1])
    sample_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.asarray(order))
    permuted = run(shape, sample_keys, labels[order])
    np.testing.assert_allclose(permuted, batch[order], rtol=1e-6, atol=1e-6)


def test_documented_x_T_and_step_noise_of_each_sample():
    """Sample i: x_T = normal(fold_in(key_i, T)), step noise normal(fold_in(key_i, t))."""
    diff = ours.create_diffusion(steps=40, timestep_respacing="5")
    shape = (3, 2, 2, 3)
    sample_keys = jax.random.split(jax.random.key(8), shape[0])  # per-sample keys [B]
    num_steps = diff.num_timesteps

    def per_sample(t):
        return jnp.stack(
            [
                jax.random.normal(jax.random.fold_in(k, t), shape[1:], jnp.float32)
                for k in sample_keys
            ]
        )

    x_T = per_sample(num_steps)
    drawn = diff.ddim_sample_loop(_labelled_model, shape, sample_keys)  # eta=0: x_T only
    given = diff.ddim_sample_loop(_labelled_model, shape, None, noise=x_T)
    np.testing.assert_array_equal(drawn, given)
    # Ancestral steps by hand with the documented noise reproduce the loop.
    got = diff.p_sample_loop(_labelled_model, shape, sample_keys)
    x = x_T
    for t in reversed(range(num_steps)):
        x = diff.p_sample(_labelled_model, x, jnp.full((shape[0],), t), noise=per_sample(t))[
            "sample"
        ]
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6)


def test_rng_of_the_wrong_batch_shape_raises_naming_rng():
    diff = ours.create_diffusion(steps=40, timestep_respacing="5")
    with pytest.raises(ValueError, match=r"rng must be one jax.random.key or a batch of 4 keys"):
        diff.p_sample_loop(_labelled_model, (4, 2, 2, 3), jax.random.split(jax.random.key(0), 3))


def test_sharded_batch_samples_equal_single_device():
    """Per-sample keys and x_T sharded over the 8-device 'data' mesh: the same samples
    as on one device, the batch stays sharded, and any slice of the job run as its own
    batch (another device count, a resumed job) gives the same samples."""
    from diffusion_jax import parallel

    mesh = parallel.create_mesh()
    shape = (8, 2, 2, 3)
    diff = ours.create_diffusion(steps=100, timestep_respacing="ddim10")
    job_key = jax.random.key(5)
    global_index = jnp.arange(shape[0])
    sample_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(job_key, global_index)
    single = diff.p_sample_loop(_counted_model, shape, sample_keys)
    sharding = parallel.data_sharding(mesh)
    sharded = diff.p_sample_loop(_counted_model, shape, jax.device_put(sample_keys, sharding))
    assert sharded.sharding.is_equivalent_to(sharding, len(shape))
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)
    second_half = diff.p_sample_loop(_counted_model, (4, *shape[1:]), sample_keys[4:])
    np.testing.assert_allclose(second_half, single[4:], rtol=1e-6, atol=1e-6)
    # A fixed x_T sharded over the mesh with a single key: same as unsharded.
    x_T = jax.random.normal(jax.random.key(6), shape, jnp.float32)
    one_key = jax.random.key(9)
    single = diff.ddim_sample_loop(_counted_model, shape, one_key, noise=x_T, eta=1.0)
    sharded = diff.ddim_sample_loop(
        _counted_model, shape, one_key, noise=jax.device_put(x_T, sharding), eta=1.0
    )
    assert sharded.sharding.is_equivalent_to(sharding, len(shape))
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


# --- Classifier guidance of an unconditional model. -----------------------------------


def _tiny_model_config(**overrides):
    from configs.base import get_base_config

    cfg = get_base_config().model
    cfg.image_size = 8
    cfg.num_channels = 32
    cfg.num_res_blocks = 1
    cfg.channel_mult = (1, 2)
    cfg.attention_resolutions = (4,)
    cfg.dtype = "float32"
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def _apply_dropping_y(apply_fn, variables, x, t, y=None):
    """The old workaround (the paper's classifier_sample.py): the model ignores y."""
    del y
    return apply_fn(variables, x, t)


@pytest.fixture(scope="module")
def uncond_model_and_classifier():
    from diffusion_jax.models import create_classifier, create_model

    unet = create_model(_tiny_model_config(num_classes=None))
    classifier = create_classifier(
        _tiny_model_config(kind="classifier", num_classes=5, num_head_channels=32)
    )
    x = jnp.zeros((1, 8, 8, 3), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    rng = np.random.default_rng(0)

    def random_variables(module):
        # Random weights of init's shapes: compiling `init` would cost more than the test.
        shapes = jax.eval_shape(module.init, jax.random.key(0), x, t)
        return jax.tree.map(
            lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes
        )

    return unet, random_variables(unet), classifier, random_variables(classifier)


def test_unconditional_unet_guided_by_classifier_with_cond_kwargs(uncond_model_and_classifier):
    """configs/imagenet256_uncond.py's setting in small: our unconditional UNet, our
    classifier's guidance, labels passed to cond_fn only."""
    unet, unet_vars, classifier, clf_vars = uncond_model_and_classifier
    diff = ours.create_diffusion(steps=100, timestep_respacing="ddim5")
    shape = (2, 8, 8, 3)
    labels = jnp.array([1, 4])
    x_T = jax.random.normal(jax.random.key(2), shape, jnp.float32)
    model_fn = jax.tree_util.Partial(unet.apply, unet_vars)
    cond_fn = ours.classifier_cond_fn(classifier.apply, clf_vars, 10.0)

    guided = diff.ddim_sample_loop(
        model_fn, shape, None, noise=x_T, cond_fn=cond_fn, cond_kwargs={"y": labels}
    )
    unguided = diff.ddim_sample_loop(model_fn, shape, None, noise=x_T)
    assert _max_rel(guided, unguided) > 1e-3  # guidance did something
    workaround = jax.tree_util.Partial(_apply_dropping_y, unet.apply, unet_vars)
    old_way = diff.ddim_sample_loop(
        workaround, shape, None, noise=x_T, cond_fn=cond_fn, model_kwargs={"y": labels}
    )
    np.testing.assert_allclose(guided, old_way, rtol=1e-6, atol=1e-6)
    # Why cond_kwargs is needed: the unconditional UNet refuses labels.
    with pytest.raises(ValueError, match="num_classes=None"):
        diff.ddim_sample_loop(
            model_fn, shape, None, noise=x_T, cond_fn=cond_fn, model_kwargs={"y": labels}
        )


def _uncond_model(x, t, **kwargs):
    if kwargs:
        raise ValueError(f"unconditional stand-in model got {sorted(kwargs)}")
    return _counted_model(x, t)


def _uncond_model_dropping_y(x, t, y=None):
    return _uncond_model(x, t)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_cond_kwargs_reach_cond_fn_only(loop):
    """Algorithm 1 (ancestral) and 2 (DDIM, eta > 0): cond_kwargs == the drop-y wrapper."""
    diff = ours.create_diffusion(steps=100, timestep_respacing="ddim10")
    sample = getattr(diff, loop)
    shape = SHAPE
    labels = jnp.asarray(LABELS)
    extra = dict(eta=0.5) if loop == "ddim_sample_loop" else {}
    x_T = jax.random.normal(jax.random.key(0), shape)
    rng = jax.random.key(1)
    cond_fn = ours.classifier_cond_fn(_linear_classifier, _classifier_params(), 3.0)
    guided = sample(
        _uncond_model, shape, rng, noise=x_T, cond_fn=cond_fn, cond_kwargs={"y": labels}, **extra
    )
    old_way = sample(
        _uncond_model_dropping_y,
        shape,
        rng,
        noise=x_T,
        cond_fn=cond_fn,
        model_kwargs={"y": labels},
        **extra,
    )
    np.testing.assert_allclose(guided, old_way, rtol=1e-12, atol=1e-12)
    unguided = sample(_uncond_model, shape, rng, noise=x_T, **extra)
    assert _max_rel(guided, unguided) > 1e-3
    # Guidance without labels names y instead of failing on a missing argument.
    with pytest.raises(ValueError, match=r"cond_kwargs=\{'y': labels\}"):
        sample(_uncond_model, shape, rng, noise=x_T, cond_fn=cond_fn, **extra)
    with pytest.raises(ValueError, match=r"cond_kwargs\['y'\] must have a leading batch axis"):
        sample(
            _uncond_model,
            shape,
            rng,
            noise=x_T,
            cond_fn=cond_fn,
            cond_kwargs={"y": labels[:1]},
            **extra,
        )


def test_classifier_cond_fn_without_labels_raises_naming_y():
    cond_fn = ours.classifier_cond_fn(_linear_classifier, _classifier_params(), 1.0)
    x = jnp.zeros(SHAPE)
    t = jnp.array([3, 17])
    with pytest.raises(ValueError, match="needs the labels y"):
        cond_fn(x, t)
    with pytest.raises(ValueError, match=r"y \(the guidance labels\) must have shape \(2,\)"):
        cond_fn(x, t, y=jnp.array([1, 2, 3]))
