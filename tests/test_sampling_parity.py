"""Converted random guided-diffusion models sample as the paper's own code does.

The models are the reference's UNet and classifier, randomised and saved as `.pt`, then
converted (see _sampling_models). The reference side runs guided_diffusion's
`ddim_sample_loop` / `p_sample` with a classifier-gradient cond_fn (written here after the
paper's guidance rule), float32 on both sides.
"""

import _sampling_models as sm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffusion_reference import scripted_randn_like, to_nchw, to_nhwc

from diffusion_jax import checkpoints, models, parallel
from diffusion_jax.diffusion import SamplerOptions, classifier_cond_fn, create_diffusion
from diffusion_jax.sampling import SamplingProgram, ShardedSampler, to_uint8

torch = pytest.importorskip("torch")
script_util = pytest.importorskip("guided_diffusion.script_util")

SCALE = 4.0
RESPACING = "ddim4"
LABELS = np.array([3, 141, 592, 653, 589, 793, 238, 462], np.int64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ck = sm.make_checkpoints(tmp_path_factory.mktemp("ckpt"))
    config = ck["base_config"]
    diffusion_kwargs = {
        k: config.diffusion[k] for k in config.diffusion if k != "timestep_respacing"
    }
    reference = script_util.create_gaussian_diffusion(
        **diffusion_kwargs, timestep_respacing=RESPACING
    )
    ours = create_diffusion(config.diffusion, timestep_respacing=RESPACING)
    params, _ = checkpoints.restore_params(ck["base_dir"])
    classifier_params, _ = checkpoints.restore_params(ck["classifier_dir"])
    return dict(ck=ck, reference=reference, ours=ours, params=params, cparams=classifier_params)


def _reference_cond_fn(classifier):
    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            chosen = log_probs[torch.arange(len(y)), y.view(-1)]
            return torch.autograd.grad(chosen.sum(), x_in)[0] * SCALE

    return cond_fn


def _ours(pair):
    ck = pair["ck"]
    model = models.create_model(ck["base_config"].model)
    classifier = models.create_classifier(ck["classifier_config"].model)
    model_fn = jax.tree_util.Partial(model.apply, {"params": pair["params"]})
    cond_fn = classifier_cond_fn(classifier.apply, {"params": pair["cparams"]}, SCALE)
    return model, classifier, model_fn, cond_fn


def test_guided_ddim_equals_reference_from_the_same_x_T(pair):
    model, classifier, model_fn, cond_fn = _ours(pair)
    ck = pair["ck"]
    job_key = jax.random.key(11)
    shape = (len(LABELS), 16, 16, 3)
    # x_T as the sampling job derives it inside its program: from fold_in(job_key, i).
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(job_key, jnp.arange(len(LABELS)))
    x_T = pair["ours"].initial_noise(keys, shape[1:])
    got = pair["ours"].ddim_sample_loop(
        model_fn, shape, None, noise=x_T, cond_fn=cond_fn, model_kwargs={"y": jnp.asarray(LABELS)}
    )
    with torch.no_grad():
        want = pair["reference"].ddim_sample_loop(
            lambda x, t, y=None: ck["base_net"](x, t, y),
            to_nchw(x_T).shape,
            noise=to_nchw(x_T),
            cond_fn=_reference_cond_fn(ck["classifier_net"]),
            model_kwargs={"y": torch.from_numpy(LABELS)},
            eta=0.0,
            device=torch.device("cpu"),
        )
    want = to_nhwc(want)
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"guided DDIM: max |ours - reference| = {err:.2e}")
    assert err < 1e-3, err
    unguided = pair["ours"].ddim_sample_loop(
        model_fn, shape, None, noise=x_T, model_kwargs={"y": jnp.asarray(LABELS)}
    )
    assert float(np.max(np.abs(np.asarray(unguided) - want))) > 100 * err  # guidance matters
    # The sharded job program (8 devices) draws the same images from the same key.
    program = SamplingProgram(
        diffusion=pair["ours"],
        options=SamplerOptions(kind="ddim"),
        model=model,
        image_shape=shape[1:],
        mesh=parallel.create_mesh(),
        class_conditional=True,
        classifier=classifier,
    )
    sampler = ShardedSampler(
        program,
        pair["params"],
        job_key,
        classifier_params=pair["cparams"],
        classifier_scale=SCALE,
    )
    images, _ = sampler.sample(np.arange(len(LABELS)), LABELS)
    diff = np.abs(images.astype(int) - np.asarray(to_uint8(jnp.asarray(want))).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())


def test_guided_ancestral_step_equals_reference_for_the_same_noise(pair):
    model, classifier, _, _ = _ours(pair)
    ck = pair["ck"]
    rng = np.random.default_rng(0)
    shape = (len(LABELS), 16, 16, 3)
    x = rng.standard_normal(shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)

    @jax.jit
    def step(params, classifier_params, t):
        model_fn = jax.tree_util.Partial(model.apply, {"params": params})
        cond_fn = classifier_cond_fn(classifier.apply, {"params": classifier_params}, SCALE)
        return pair["ours"].p_sample(
            model_fn,
            jnp.asarray(x),
            t,
            noise=jnp.asarray(eps),
            cond_fn=cond_fn,
            model_kwargs={"y": jnp.asarray(LABELS)},
        )["sample"]

    for t_value in (3, 1):
        t = np.full((len(LABELS),), t_value, np.int64)
        got = step(pair["params"], pair["cparams"], jnp.asarray(t, jnp.int32))
        with torch.no_grad(), scripted_randn_like([to_nchw(eps)]):
            want = pair["reference"].p_sample(
                lambda x, t, y=None: ck["base_net"](x, t, y),
                to_nchw(x),
                torch.from_numpy(t),
                cond_fn=_reference_cond_fn(ck["classifier_net"]),
                model_kwargs={"y": torch.from_numpy(LABELS)},
            )["sample"]
        err = float(np.max(np.abs(np.asarray(got) - to_nhwc(want))))
        print(f"ancestral step t={t_value}: max |ours - reference| = {err:.2e}")
        assert err < 1e-4, (t_value, err)
