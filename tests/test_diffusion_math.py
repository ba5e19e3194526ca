"""Parity of the diffusion math with the paper code (guided-diffusion-sdk, CPU torch).

The parity tests run in float64 (the `x64` fixture), with the reference's float32
table lookup patched to float64 (see _diffusion_reference.float64_reference), so
differences measure the math alone; the training losses are also checked in float32,
the dtype training runs in, against the unpatched reference. Everything else runs in
the suite's float32 default.
"""

import itertools

import _diffusion_reference as ref_lib
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as ours

torch = pytest.importorskip("torch")
gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
respace_ref = pytest.importorskip("guided_diffusion.respace")
script_util = pytest.importorskip("guided_diffusion.script_util")

RTOL = 1e-10  # float64 vs float64: only rounding-order differences remain
SHAPE = (4, 4, 4, 3)  # [B, H, W, C]


def _close(actual, expected, rtol=RTOL, atol=1e-12, what=""):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol, err_msg=what)


def _inputs(diff, seed=0):
    rng = np.random.default_rng(seed)
    # Data on the uint8 grid (the discretised decoder assumes it), both edges included.
    x_start = rng.integers(0, 256, size=SHAPE) / 127.5 - 1.0
    x_start[0, 0, 0] = [-1.0, 1.0, 0.0]
    noise = rng.standard_normal(SHAPE)
    x_t = rng.standard_normal(SHAPE)
    num_steps = diff.num_timesteps
    t = np.array([0, num_steps - 1, 1, rng.integers(2, num_steps - 1)])
    y = np.array([0, 3, 7, 1])
    return x_start, noise, x_t, t, y


# --- Schedules and respacing. ------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [21, 25, 1000, 4000])
def test_beta_schedules_match_paper_code(name, steps):
    expected = gd.get_named_beta_schedule(name, steps)
    actual = ours.get_named_beta_schedule(name, steps)
    assert actual.dtype == np.float64 and actual.shape == (steps,)
    _close(actual, expected, rtol=1e-13)


SPACINGS = [
    (1000, "250"),
    (1000, 250),
    (1000, "10,15,20"),
    (1000, "ddim25"),
    (1000, "ddim50"),
    (1000, "ddim1000"),
    (300, "10,15,20"),
    (101, "3,7"),
    (50, ""),
    (50, None),
    (50, 0),
    (50, "0"),
    (4000, "ddim100"),
    (1000, "1,2,3,4,5,6,7"),
    (1000, (10, 15, 20)),
    (21, "20"),
    (37, "5,5,5"),
]


@pytest.mark.parametrize("steps,spacing", SPACINGS)
def test_space_timesteps_and_respaced_betas_match_paper_code(steps, spacing):
    ref_spacing = spacing
    if spacing in ("", None, 0, "0"):
        ref_spacing = [steps]
    elif isinstance(spacing, int):
        ref_spacing = [spacing]
    elif isinstance(spacing, tuple):
        ref_spacing = list(spacing)
    expected_steps = sorted(respace_ref.space_timesteps(steps, ref_spacing))
    assert ours.space_timesteps(steps, spacing) == expected_steps

    mine = ours.create_diffusion(steps=steps, timestep_respacing=spacing)
    ref = respace_ref.SpacedDiffusion(
        use_timesteps=expected_steps,
        betas=gd.get_named_beta_schedule("linear", steps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    np.testing.assert_array_equal(mine.timestep_map, ref.timestep_map)
    _close(mine.betas, ref.betas, rtol=1e-12)
    for name in (
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "sqrt_recipm1_alphas_cumprod",
    ):
        _close(mine.tables[name], getattr(ref, name), rtol=1e-12, what=name)


def test_create_diffusion_from_base_config_matches_create_gaussian_diffusion():
    from configs.base import get_base_config

    cfg = get_base_config().diffusion
    cfg.steps = 1000
    cfg.learn_sigma = True
    cfg.noise_schedule = "cosine"
    cfg.rescale_learned_sigmas = True
    cfg.timestep_respacing = "ddim25"
    mine = ours.create_diffusion(cfg)
    ref = script_util.create_gaussian_diffusion(
        steps=1000,
        learn_sigma=True,
        noise_schedule="cosine",
        rescale_learned_sigmas=True,
        timestep_respacing="ddim25",
    )
    assert (mine.model_mean_type, mine.model_var_type, mine.loss_type) == (
        "epsilon",
        "learned_range",
        "rescaled_mse",
    )
    assert ref.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert ref.loss_type == gd.LossType.RESCALED_MSE
    np.testing.assert_array_equal(mine.timestep_map, ref.timestep_map)
    _close(mine.betas, ref.betas, rtol=1e-12)
    # The flag combinations map like the paper code's.
    for flags, expected in [
        (dict(use_kl=True), ("epsilon", "fixed_large", "rescaled_kl")),
        (dict(predict_xstart=True, sigma_small=True), ("start_x", "fixed_small", "mse")),
    ]:
        d = ours.create_diffusion(steps=40, **flags)
        assert (d.model_mean_type, d.model_var_type, d.loss_type) == expected


# --- q, posterior and p. -----------------------------------------------------------

COMBOS = list(
    itertools.product(["linear", "cosine"], ["", "10,5"], ref_lib.MEAN_TYPES, ref_lib.VAR_TYPES)
)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("schedule,respacing,mean_type,var_type", COMBOS)
def test_q_and_p_mean_variance_match_paper_code(schedule, respacing, mean_type, var_type):
    mine, ref = ref_lib.make_pair(
        steps=40,
        schedule=schedule,
        respacing=respacing,
        mean_type=mean_type,
        var_type=var_type,
        rescale_timesteps=respacing == "",
    )
    learned = var_type.startswith("learned")
    model = ref_lib.StandInModel(SHAPE[-1], learned)
    x_start, noise, x_t, t, y = _inputs(mine)
    tt = torch.from_numpy(t)
    with ref_lib.float64_reference():
        for got, want in zip(
            mine.q_mean_variance(jnp.asarray(x_start), t),
            ref.q_mean_variance(ref_lib.to_nchw(x_start), tt),
        ):
            _close(got, ref_lib.to_nhwc(want), what="q_mean_variance")
        _close(
            mine.q_sample(jnp.asarray(x_start), t, jnp.asarray(noise)),
            ref_lib.to_nhwc(
                ref.q_sample(ref_lib.to_nchw(x_start), tt, noise=ref_lib.to_nchw(noise))
            ),
            what="q_sample",
        )
        for got, want in zip(
            mine.q_posterior_mean_variance(jnp.asarray(x_start), jnp.asarray(x_t), t),
            ref.q_posterior_mean_variance(ref_lib.to_nchw(x_start), ref_lib.to_nchw(x_t), tt),
        ):
            _close(got, ref_lib.to_nhwc(want), what="q_posterior_mean_variance")

        def denoised_fn(x):
            return 1.3 * x  # makes clipping bite and checks it runs before the clip

        for clip, dfn in [(True, None), (False, None), (True, denoised_fn)]:
            got = mine.p_mean_variance(
                model,
                jnp.asarray(x_t),
                t,
                clip_denoised=clip,
                denoised_fn=dfn,
                model_kwargs={"y": jnp.asarray(y)},
            )
            want = ref.p_mean_variance(
                model.torch,
                ref_lib.to_nchw(x_t),
                tt,
                clip_denoised=clip,
                denoised_fn=dfn,
                model_kwargs={"y": torch.from_numpy(y)},
            )
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                # x_{t-1} prediction divides by posterior_mean_coef1 (~1e-3 at large t).
                rtol = 1e-8 if mean_type == "previous_x" else RTOL
                _close(
                    got[key],
                    ref_lib.to_nhwc(want[key]),
                    rtol=rtol,
                    atol=1e-11,
                    what=f"p_mean_variance[{key}] clip={clip} denoised_fn={dfn}",
                )


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("var_type", list(ref_lib.VAR_TYPES))
@pytest.mark.parametrize("guided", [False, True])
def test_ancestral_step_matches_paper_code(var_type, guided):
    """p_sample (Algorithm 1 when guided): same mean, variance and sample given noise."""
    mine, ref = ref_lib.make_pair(
        steps=40, schedule="cosine", respacing="20", var_type=var_type, rescale_timesteps=True
    )
    model = ref_lib.StandInModel(SHAPE[-1], var_type.startswith("learned"), seed=1)
    _, noise, x_t, t, y = _inputs(mine, seed=1)
    got = mine.p_sample(
        model,
        jnp.asarray(x_t),
        t,
        noise=jnp.asarray(noise),
        cond_fn=ref_lib.gaussian_cond_fn if guided else None,
        model_kwargs={"y": jnp.asarray(y)},
    )
    with ref_lib.float64_reference(), ref_lib.scripted_randn_like([ref_lib.to_nchw(noise)]):
        tt = torch.from_numpy(t)
        kwargs = {"y": torch.from_numpy(y)}
        out = ref.p_mean_variance(model.torch, ref_lib.to_nchw(x_t), tt, model_kwargs=kwargs)
        want_mean = out["mean"]
        if guided:
            want_mean = ref.condition_mean(
                ref_lib.gaussian_cond_fn_torch, out, ref_lib.to_nchw(x_t), tt, model_kwargs=kwargs
            )
        want = ref.p_sample(
            model.torch,
            ref_lib.to_nchw(x_t),
            tt,
            model_kwargs=kwargs,
            cond_fn=ref_lib.gaussian_cond_fn_torch if guided else None,
        )
    # The paper code rounds the guided mean to float32 (`.float()`), hence 1e-6 there.
    rtol = 1e-6 if guided else RTOL
    _close(got["mean"], ref_lib.to_nhwc(want_mean), rtol=rtol, atol=1e-7)
    _close(got["log_variance"], ref_lib.to_nhwc(out["log_variance"]))
    _close(got["sample"], ref_lib.to_nhwc(want["sample"]), rtol=rtol, atol=1e-7)
    _close(got["pred_xstart"], ref_lib.to_nhwc(want["pred_xstart"]))
    # Guidance moved the mean by exactly variance * gradient.
    if guided:
        t_model = mine.model_timesteps(jnp.asarray(t), jnp.float64)
        unguided = mine.p_mean_variance(
            model, jnp.asarray(x_t), t, model_kwargs={"y": jnp.asarray(y)}
        )
        shift = unguided["variance"] * ref_lib.gaussian_cond_fn(
            jnp.asarray(x_t), t_model, jnp.asarray(y)
        )
        _close(got["mean"] - unguided["mean"], shift, rtol=1e-9, atol=1e-12)


# --- Objectives. -------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("schedule,respacing,mean_type,var_type", COMBOS)
def test_training_losses_match_paper_code(schedule, respacing, mean_type, var_type):
    x_start, noise, _, _, y = None, None, None, None, None
    for loss_type in ref_lib.LOSS_TYPES:
        mine, ref = ref_lib.make_pair(
            steps=40,
            schedule=schedule,
            respacing=respacing,
            mean_type=mean_type,
            var_type=var_type,
            loss_type=loss_type,
        )
        model = ref_lib.StandInModel(SHAPE[-1], var_type.startswith("learned"), seed=2)
        x_start, noise, _, t, y = _inputs(mine, seed=2)
        got = mine.training_losses(
            model,
            jnp.asarray(x_start),
            jnp.asarray(t),
            noise=jnp.asarray(noise),
            model_kwargs={"y": jnp.asarray(y)},
        )
        with ref_lib.float64_reference():
            want = ref.training_losses(
                model.torch,
                ref_lib.to_nchw(x_start),
                torch.from_numpy(t),
                noise=ref_lib.to_nchw(noise),
                model_kwargs={"y": torch.from_numpy(y)},
            )
        # The decoder NLL (t = 0) subtracts two CDF values near 1, so ulp-level tanh
        # differences between torch and XLA reach ~1e-8 relative there.
        rtol = 1e-7
        for key, value in want.items():
            _close(got[key], value.numpy(), rtol=rtol, atol=1e-10, what=f"{loss_type} {key}")
        assert got["loss"].shape == (SHAPE[0],)
        has_vb = var_type.startswith("learned") or loss_type.endswith("kl")
        assert ("vb" in got) == has_vb
        if loss_type.endswith("kl"):
            scale = mine.num_timesteps if loss_type == "rescaled_kl" else 1.0
            _close(got["loss"], np.asarray(got["vb"]) * scale)


@pytest.mark.parametrize(
    "var_type,loss_type", [("fixed_small", "mse"), ("learned_range", "rescaled_mse")]
)
def test_training_losses_match_paper_code_in_float32(var_type, loss_type):
    """The float32 training path against the stock (float32 table lookup) reference."""
    mine, ref = ref_lib.make_pair(
        steps=1000, schedule="cosine", var_type=var_type, loss_type=loss_type
    )
    model = ref_lib.StandInModel(SHAPE[-1], var_type.startswith("learned"), seed=2)
    x_start, noise, _, t, y = (
        a.astype(np.float32) if a.dtype == np.float64 else a for a in _inputs(mine, seed=2)
    )
    got = mine.training_losses(
        model,
        jnp.asarray(x_start),
        jnp.asarray(t),
        noise=jnp.asarray(noise),
        model_kwargs={"y": jnp.asarray(y)},
    )
    want = ref.training_losses(
        model.torch,
        ref_lib.to_nchw(x_start),
        torch.from_numpy(t),
        noise=ref_lib.to_nchw(noise),
        model_kwargs={"y": torch.from_numpy(y)},
    )
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == jnp.float32 and value.dtype == torch.float32
        # Both sides in float32 with tables rounded to float32: a few ulp apart (the
        # decoder NLL at t = 0, a difference of two CDFs near 1, is the worst, ~3e-7).
        _close(got[key], value.numpy(), rtol=2e-6, atol=1e-6, what=f"{loss_type} {key}")


@pytest.mark.usefixtures("x64")
def test_hybrid_loss_gradient_stops_at_the_mean_like_paper_code():
    """L_hybrid: the VLB term trains only the variance channels; gradients equal torch's."""
    mine, ref = ref_lib.make_pair(
        steps=40,
        schedule="cosine",
        respacing="ddim10",
        var_type="learned_range",
        loss_type="rescaled_mse",
    )
    x_start, noise, _, t, _ = _inputs(mine, seed=3)
    raw = np.random.default_rng(3).uniform(-0.9, 0.9, size=(*SHAPE[:-1], 2 * SHAPE[-1]))

    def loss_of(out, key):
        def model_fn(x, t_model):
            return out

        terms = mine.training_losses(
            model_fn, jnp.asarray(x_start), jnp.asarray(t), noise=jnp.asarray(noise)
        )
        return jnp.sum(terms[key])

    grad_vb = jax.grad(loss_of)(jnp.asarray(raw), "vb")
    assert np.all(np.asarray(grad_vb[..., :3]) == 0.0)  # mean channels: stopped
    assert np.abs(np.asarray(grad_vb[..., 3:])).max() > 0  # variance channels: trained

    out_t = ref_lib.to_nchw(raw).requires_grad_(True)
    with ref_lib.float64_reference():
        terms = ref.training_losses(
            lambda x, t: out_t,
            ref_lib.to_nchw(x_start),
            torch.from_numpy(t),
            noise=ref_lib.to_nchw(noise),
        )
    terms["loss"].sum().backward()
    grad_loss = jax.grad(loss_of)(jnp.asarray(raw), "loss")
    _close(grad_loss, ref_lib.to_nhwc(out_t.grad), rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_discretized_gaussian_log_likelihood_and_normal_kl_match_paper_code():
    losses_ref = pytest.importorskip("guided_diffusion.losses")
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(2, 3, 5, 5)) / 127.5 - 1.0
    means = x + 0.05 * rng.standard_normal(x.shape)
    log_scales = rng.uniform(-6.0, 0.0, size=x.shape)
    got = ours.discretized_gaussian_log_likelihood(
        jnp.asarray(x), means=jnp.asarray(means), log_scales=jnp.asarray(log_scales)
    )
    want = losses_ref.discretized_gaussian_log_likelihood(
        torch.from_numpy(x), means=torch.from_numpy(means), log_scales=torch.from_numpy(log_scales)
    )
    # Deep-tail bins subtract two CDF values near 1: ulp differences of tanh between
    # torch and XLA grow to ~3e-8 relative there.
    _close(got, want.numpy(), rtol=1e-7)
    # Probabilities of the 256 bins sum to 1 (closed-form check, independent of torch).
    grid = jnp.linspace(-1.0, 1.0, 256)
    p = jnp.exp(
        ours.discretized_gaussian_log_likelihood(
            grid, means=jnp.full_like(grid, 0.1), log_scales=jnp.full_like(grid, -2.0)
        )
    )
    assert abs(float(jnp.sum(p)) - 1.0) < 1e-9
    mean2, logvar2 = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    _close(
        ours.normal_kl(
            jnp.asarray(means), jnp.asarray(log_scales), jnp.asarray(mean2), jnp.asarray(logvar2)
        ),
        losses_ref.normal_kl(
            torch.from_numpy(means),
            torch.from_numpy(log_scales),
            torch.from_numpy(mean2),
            torch.from_numpy(logvar2),
        ).numpy(),
    )


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("var_type,respacing", [("learned_range", "10"), ("fixed_small", "")])
def test_calc_bpd_loop_matches_paper_code(var_type, respacing):
    mine, ref = ref_lib.make_pair(
        steps=30, schedule="linear", respacing=respacing, var_type=var_type
    )
    model = ref_lib.StandInModel(SHAPE[-1], var_type.startswith("learned"), seed=5)
    x_start, *_ = _inputs(mine, seed=5)
    num_steps = mine.num_timesteps
    noise = np.random.default_rng(5).standard_normal((num_steps, *SHAPE))
    got = mine.calc_bpd_loop(model, jnp.asarray(x_start), noise=jnp.asarray(noise))
    # The reference draws its q_sample noise per step, walking t from T-1 down to 0.
    scripted = [ref_lib.to_nchw(noise[t]) for t in reversed(range(num_steps))]
    with ref_lib.float64_reference(), ref_lib.scripted_randn_like(scripted) as left:
        want = ref.calc_bpd_loop(model.torch, ref_lib.to_nchw(x_start))
    assert not left
    for key in ("total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"):
        _close(got[key], want[key].numpy(), rtol=1e-7, atol=1e-11, what=key)
    assert got["vb"].shape == (SHAPE[0], num_steps)
    # Without fixed noise the loop draws its own; the prior term does not depend on it.
    drawn = mine.calc_bpd_loop(model, jnp.asarray(x_start), jax.random.key(0))
    _close(drawn["prior_bpd"], want["prior_bpd"].numpy())
    assert np.all(np.isfinite(np.asarray(drawn["total_bpd"])))


def test_calc_bpd_loop_draws_per_image_noise():
    """Image i's bits/dim depend on its key fold_in(rng, i) alone, not on the batch."""
    mine = ours.create_diffusion(steps=30, timestep_respacing="10", learn_sigma=True)
    model = ref_lib.StandInModel(SHAPE[-1], True, seed=5)
    x_start, *_ = _inputs(mine, seed=6)
    rng = jax.random.key(1)
    batch = mine.calc_bpd_loop(model, jnp.asarray(x_start), rng)
    for i in (0, 3):
        alone = mine.calc_bpd_loop(
            model, jnp.asarray(x_start[i : i + 1]), jax.random.fold_in(rng, i)[None]
        )
        for key in ("total_bpd", "vb", "mse"):
            _close(alone[key][0], np.asarray(batch[key][i]), rtol=1e-12, what=key)
    assert np.abs(np.asarray(batch["mse"][0] - batch["mse"][1])).max() > 1e-3


# --- Errors that name the parameter. -----------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(noise_schedule="quadratic"), "noise_schedule"),
        (dict(model_mean_type="velocity"), "model_mean_type"),
        (dict(model_var_type="fixed_medium"), "model_var_type"),
        (dict(loss_type="l1"), "loss_type"),
        (dict(steps=50, timestep_respacing="100"), "timestep_respacing.*100 steps.*steps=50"),
        (dict(steps=50, timestep_respacing="ddim100"), "timestep_respacing.*ddim100"),
        (dict(steps=100, timestep_respacing="ddim30"), "timestep_respacing.*integer stride"),
        (dict(steps=100, timestep_respacing="10,40,40"), "timestep_respacing.*section 1"),
        (dict(steps=100, timestep_respacing="ten"), "timestep_respacing"),
        (dict(steps=100, timestep_respacing="1"), "at least 2"),
        (dict(steps=0), "steps"),
        (dict(steps=20), "noise_schedule='linear' with steps=20"),
        (dict(stepz=10), "stepz"),
    ],
)
def test_bad_configuration_raises_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours.create_diffusion(**kwargs)


def test_mismatched_shapes_raise_naming_the_argument():
    diff = ours.create_diffusion(steps=40, learn_sigma=True)
    model = ref_lib.StandInModel(3, learned_sigma=True)
    x = jnp.zeros((2, 4, 4, 3))
    t = jnp.array([1, 2])
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        diff.p_mean_variance(model, x, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="t must hold integer"):
        diff.q_sample(x, jnp.array([1.0, 2.0]), x)
    with pytest.raises(ValueError, match="noise must have x_start's shape"):
        diff.q_sample(x, t, jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\]"):
        diff.training_losses(model, x, t, noise=x, model_kwargs={"y": jnp.array([0, 1, 2])})
    with pytest.raises(ValueError, match="model_fn output must have shape"):
        diff.p_mean_variance(ref_lib.StandInModel(3, learned_sigma=False), x, t)
    with pytest.raises(ValueError, match="rng"):
        diff.training_losses(model, x, t)
    with pytest.raises(ValueError, match=r"rng must be one jax\.random\.key for the whole batch"):
        diff.training_losses(model, x, t, rng=jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match=r"noise \(x_T\) must have shape"):
        diff.ddim_sample_loop(model, (2, 4, 4, 3), None, noise=jnp.zeros((3, 4, 4, 3)))
    with pytest.raises(ValueError, match="needs rng"):
        diff.p_sample_loop(model, (2, 4, 4, 3), None, noise=x)
    with pytest.raises(ValueError, match=r"eta must be 0\.0"):
        diff.ddim_reverse_sample(model, x, t, eta=0.5)


@pytest.mark.parametrize("bad_t", [[5, 40], [5, -1], [40, 0]])
def test_out_of_range_timesteps_raise_naming_t(bad_t):
    """Concrete t outside [0, num_timesteps) raises (the paper code: IndexError)."""
    diff = ours.create_diffusion(steps=40)
    model = ref_lib.StandInModel(3, learned_sigma=False)
    x = jnp.zeros((2, 4, 4, 3))
    t = jnp.asarray(bad_t)
    match = r"t must hold timestep indices in \[0, 40\)"
    with pytest.raises(ValueError, match=match):
        diff.training_losses(model, x, t, rng=jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        diff.q_sample(x, np.asarray(bad_t), x)
    with pytest.raises(ValueError, match=match):
        diff.p_sample(model, x, t, jax.random.key(0))
    diff.training_losses(model, x, jnp.array([0, 39]), rng=jax.random.key(0))  # the ends


def test_timestep_range_is_that_of_the_respaced_process():
    diff = ours.create_diffusion(steps=40, timestep_respacing=10)
    x = jnp.zeros((1, 4, 4, 3))
    diff.q_sample(x, jnp.array([9]), x)
    with pytest.raises(ValueError, match=r"\[0, 10\).*after respacing.*\[10, 10\]"):
        diff.q_sample(x, jnp.array([10]), x)


def test_traced_timesteps_are_not_range_checked():
    """Under jit t's values are unknown: the check is skipped, not turned into an error."""
    diff = ours.create_diffusion(steps=40)
    x = jnp.ones((2, 4, 4, 3))
    q_sample = jax.jit(lambda t: diff.q_sample(x, t, x))
    np.testing.assert_allclose(
        q_sample(jnp.array([3, 39])), diff.q_sample(x, jnp.array([3, 39]), x)
    )
    assert q_sample(jnp.array([3, 40])).shape == x.shape  # clamped lookup, documented
