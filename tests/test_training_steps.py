"""Train steps: sharded == single device, FSDP == replicated, microbatched == one batch, a
checkpoint moves between meshes.

The diffusion steps train with label dropout (classifier-free guidance), so each of
these equalities holds for the dropped labels too.

Adam's first steps are sign-like (g / (|g| + eps)), so float32 reduction-order noise in
near-zero gradients would flip whole updates; these comparisons use optim.eps = 1 so
the update is smooth in the gradient and a real difference in the gradient shows.
"""

import json

import jax
import numpy as np
import pytest

from configs import quickstart
from diffusion_jax import parallel
from diffusion_jax.training import checks, ema_key, loop

LABEL_DROPOUT = 0.25


def tiny_config(mesh_fsdp=1, **training):
    config = quickstart.get_config()
    config.mesh.fsdp = mesh_fsdp
    model = config.model
    model.image_size = 8
    model.num_channels = 32
    model.channel_mult = (1, 2)
    model.num_res_blocks = 1
    model.resblock_updown = False
    model.attention_resolutions = (4,)
    model.dtype = "float32"
    config.optim.eps = 1.0
    config.optim.lr = 1e-2
    config.optim.warmup_steps = 0
    config.training.ema_warmup = False
    config.training.batch_size = 16
    config.training.num_steps = 100
    config.training.ema_rates = (0.9, 0.99)
    config.training.schedule_sampler = "loss-second-moment"
    config.training.decoder_share = 0.0  # the quickstart's share is for uniform t only
    config.training.label_dropout = LABEL_DROPOUT  # linked: model.label_dropout
    config.training.update(training)
    return config


def batch_for(config, seed=0):
    rng = np.random.default_rng(seed)
    b, s = config.training.batch_size, config.model.image_size
    return {
        "image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
        "label": rng.integers(0, 10, (b,)).astype(np.int32),
    }


def run_steps(config, devices, num_steps=2, trainer="diffusion", state=None, setup=None):
    mesh = parallel.create_mesh_from_config(config, devices)
    checks.check_training_config(config, trainer, len(devices))
    setup = setup or loop.create_setup(config, mesh, trainer)
    state = setup.init() if state is None else state
    metrics = None
    for i in range(int(jax.device_get(state.step)), num_steps):
        batch = jax.device_put(batch_for(config, i), parallel.data_sharding(mesh))
        state, metrics = setup.train_step(state, batch)
    return jax.device_get(state), jax.device_get(metrics), setup


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(tiny_config(), jax.devices()[:1])


@pytest.fixture(scope="module")
def setup8():
    config = tiny_config()
    mesh = parallel.create_mesh()
    return config, mesh, loop.create_setup(config, mesh, "diffusion")


def test_train_steps_compile_once(setup8):
    """N steps run one program: the donated state comes back with the shardings the step
    takes, so no step recompiles (counted with jax.monitoring, as bench/ does)."""
    from _compiles import count_compiles

    config, mesh, setup = setup8
    state = setup.init()
    batches = [jax.device_put(batch_for(config, i), parallel.data_sharding(mesh)) for i in range(2)]
    state, _ = setup.train_step(state, batches[0])  # compiles unless an earlier test did
    with count_compiles() as compiled:
        for i in range(3):
            state, metrics = setup.train_step(state, batches[i % 2])
        jax.block_until_ready(metrics)
    assert compiled == [], compiled
    assert setup.train_step._cache_size() == 1
    assert int(state.step) == 4


def test_sharded_step_equals_single_device(single_device_run, setup8):
    state1, metrics1, _ = single_device_run
    config, mesh, setup = setup8
    init = jax.device_get(setup.init())
    state8 = setup.init()
    for i in range(2):
        state8, metrics8 = setup.train_step(
            state8, jax.device_put(batch_for(config, i), parallel.data_sharding(mesh))
        )
    state8, metrics8 = jax.device_get((state8, metrics8))
    assert int(state8.step) == 2
    # The step really changed the parameters (by far more than the tolerance).
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(init.params))
    )
    assert moved > 1e-3
    diff = max_difference(state8.params, state1.params)
    print(f"mesh.fsdp=1 (data=8): max |params - single device| = {diff:.2e}")
    assert_trees_close(state8.params, state1.params)
    assert_trees_close(state8.ema, state1.ema)
    assert_trees_close(state8.opt_state, state1.opt_state, rtol=1e-4, atol=1e-7)
    # Label dropout: the embedding has the null row (10 classes + 1), and the same
    # labels of the batch were replaced by the null class 10 on 8 devices as on one.
    assert state8.params["label_emb"]["embedding"].shape[0] == 11
    assert 0.0 < float(metrics8["null_labels"]) < 1.0
    np.testing.assert_array_equal(metrics8["null_labels"], metrics1["null_labels"])
    np.testing.assert_array_equal(state8.sampler.counts, state1.sampler.counts)
    np.testing.assert_allclose(state8.sampler.history, state1.sampler.history, rtol=1e-5)
    for k in ("loss", "mse", "vb", "grad_norm", "loss_q0", "vb_q3"):
        np.testing.assert_allclose(metrics8[k], metrics1[k], rtol=1e-5, err_msg=k)


def max_difference(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def fsdp_setups():
    """mesh.fsdp -> its Setup (compiled once, shared by the tests below)."""
    setups = {}

    def get(fsdp):
        if fsdp not in setups:
            config = tiny_config(mesh_fsdp=fsdp, fsdp_min_size=256)
            mesh = parallel.create_mesh_from_config(config)
            setups[fsdp] = (config, loop.create_setup(config, mesh, "diffusion"))
        return setups[fsdp]

    return get


@pytest.mark.parametrize("fsdp", [4, 8])
def test_fsdp_step_equals_replicated(single_device_run, fsdp_setups, fsdp):
    """mesh.fsdp = 4 (data=2) and 8 (data=1) train as one device does (fsdp=1: the test
    above); measured max |difference| of the parameters after 2 steps: ~5e-10."""
    state1, metrics1, _ = single_device_run
    config, setup = fsdp_setups(fsdp)
    state, metrics, _ = run_steps(config, jax.devices(), setup=setup)
    mesh = jax.tree.leaves(setup.shardings.params)[0].mesh
    assert dict(mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
    specs = [s.spec for s in jax.tree.leaves(setup.shardings.params)]
    sharded = [s for s in specs if parallel.FSDP_AXIS in tuple(s)]
    assert len(sharded) >= len(specs) // 4, "FSDP should shard the large kernels"
    assert not any(parallel.DATA_AXIS in tuple(s) for s in specs)
    opt_specs = [s.spec for s in jax.tree.leaves(setup.shardings.opt_state)]
    assert any(parallel.FSDP_AXIS in tuple(s) for s in opt_specs)
    ema_specs = [s.spec for s in jax.tree.leaves(setup.shardings.ema)]
    assert any(parallel.FSDP_AXIS in tuple(s) for s in ema_specs)
    diff = max_difference(state.params, state1.params)
    print(f"mesh.fsdp={fsdp}: max |params - single device| = {diff:.2e}")
    assert_trees_close(state.params, state1.params)
    assert_trees_close(state.ema, state1.ema)
    np.testing.assert_allclose(metrics["loss"], metrics1["loss"], rtol=1e-5)


def test_fsdp_step_keeps_activations_split_by_batch(fsdp_setups):
    """Under FSDP the compiled step gathers parameters, not activations: no all-to-all
    (activations moved into a channel layout) and no all-gather of a batch-sized
    activation. Without `parallel.FsdpGather` the partitioner follows the kernels'
    channel sharding into the activations (measured on this tiny UNet: dozens of all-to-alls
    of normalisation blocks and a gather of a whole-batch [16, 8, 8, 64] activation;
    upsample64_256 at 8 devices: 256 all-to-alls, 10 whole-batch gathers up to 12 GiB)."""
    import re

    from diffusion_jax.training import aot as training_aot

    config, setup = fsdp_setups(8)
    mesh = jax.tree.leaves(setup.shardings.params)[0].mesh
    batch = training_aot.abstract_batch(config, mesh)
    hlo = setup.train_step.lower(setup.abstract_state, batch).compile().as_text()
    b = int(config.training.batch_size)
    # Every array an all-gather returns, combined (tuple) and asynchronous ones included.
    results = re.findall(r"= (.*?) all-gather(?:-start)?\(", hlo)
    shapes = [tuple(int(d) for d in dims.split(",") if d)
              for r in results for dims in re.findall(r"\[([\d,]*)\]", r)]  # fmt: skip
    assert shapes, "the FSDP step should all-gather its sharded kernels"
    activations = [s for s in shapes if len(s) >= 3 and s[0] == b]
    assert not activations, f"whole-batch activations gathered: {activations}"
    # The one all-to-all left is the label embedding's gradient (a scatter-add of the
    # batch's rows into the table): [2, 1, 16] blocks, not an activation.
    moved = [line for line in hlo.splitlines() if " all-to-all(" in line]
    assert all("label_emb" in line for line in moved), f"resharded: {moved[:2]}"


def test_checkpoint_restores_under_another_mesh(single_device_run, fsdp_setups, tmp_path):
    """One step on mesh.fsdp=8, saved; restored on data=2 x fsdp=4 (the arrays take the
    new layout) and continued: equal to the uninterrupted single-device run."""
    from diffusion_jax.checkpoints.workdir import create_manager
    from diffusion_jax.training import checkpointing

    state1, _, _ = single_device_run
    config8, setup8 = fsdp_setups(8)
    config4, setup4 = fsdp_setups(4)
    mesh8 = jax.tree.leaves(setup8.shardings.params)[0].mesh
    state = setup8.init()
    state, _ = setup8.train_step(
        state, jax.device_put(batch_for(config8, 0), parallel.data_sharding(mesh8))
    )
    manager = create_manager(tmp_path, keep=1)
    checkpointing.save(manager, state, [{"position": 0}], loop.config_json(config8))
    manager.wait_until_finished()
    restored, _, saved_config = checkpointing.restore(manager, setup4.abstract_state)
    manager.close()
    assert int(restored.step) == 1
    checks.check_resume_config(saved_config, json.loads(loop.config_json(config4)), "run")
    got = [x.sharding for x in jax.tree.leaves(restored.params)]
    assert got == jax.tree.leaves(setup4.shardings.params)
    state, _, _ = run_steps(config4, jax.devices(), state=restored, setup=setup4)
    assert int(state.step) == 2
    assert_trees_close(state.params, state1.params)
    assert_trees_close(state.ema, state1.ema)


@pytest.mark.parametrize("fsdp", [1, 8])
def test_microbatched_step_equals_one_batch(single_device_run, fsdp):
    """Two microbatches of 8 on 8 devices, parameters replicated or sharded (where each
    microbatch's gradient is reduce-scattered into the sharded running sum)."""
    state1, metrics1, _ = single_device_run
    config = tiny_config(mesh_fsdp=fsdp, microbatch=8, fsdp_min_size=256)
    state, metrics, _ = run_steps(config, jax.devices())
    assert_trees_close(state.params, state1.params)
    assert_trees_close(state.ema, state1.ema)
    np.testing.assert_array_equal(state.sampler.counts, state1.sampler.counts)
    np.testing.assert_allclose(metrics["loss"], metrics1["loss"], rtol=1e-5)


def test_nonfinite_update_is_skipped_and_counted(setup8):
    config, mesh, setup = setup8
    state = setup.init()
    before = jax.device_get(state)
    batch = batch_for(config)
    batch["image"][0, 0, 0, 0] = np.nan
    state, metrics = setup.train_step(state, jax.device_put(batch, parallel.data_sharding(mesh)))
    after = jax.device_get(state)
    assert not np.isfinite(metrics["loss"])
    assert after.nonfinite.tolist() == [1, 1] and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after.ema), jax.tree.leaves(before.ema)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(after.sampler.counts, before.sampler.counts)
    # A finite step afterwards resets the run of skipped steps but keeps the total.
    state, _ = setup.train_step(
        state, jax.device_put(batch_for(config), parallel.data_sharding(mesh))
    )
    assert jax.device_get(state.nonfinite).tolist() == [1, 0]


def test_ema_follows_its_rate(setup8):
    # After 2 steps from e0 = p0: e2 = r^2 p0 + r(1-r) p1 + (1-r) p2, from the raw
    # parameters seen along the way.
    config, mesh, setup = setup8
    state = setup.init()
    ps = [jax.device_get(state.params)]
    for i in range(2):
        batch = jax.device_put(batch_for(config, i), parallel.data_sharding(mesh))
        state, _ = setup.train_step(state, batch)
        ps.append(jax.device_get(state.params))
    for rate in (0.9, 0.99):
        want = jax.tree.map(
            lambda p0, p1, p2, r=rate: r * r * p0 + r * (1 - r) * p1 + (1 - r) * p2, *ps
        )
        got = jax.device_get(state.ema)[ema_key(rate)]
        assert_trees_close(got, want, rtol=1e-5, atol=1e-7)


def test_ema_warmup_rate_is_the_closed_form():
    from diffusion_jax.training.steps import ema_rate_at

    assert ema_rate_at(0.999, 5, False) == 0.999
    got = [float(ema_rate_at(0.995, s, True)) for s in (0, 10, 1000, 10**6)]
    np.testing.assert_allclose(got, [1 / 10, 11 / 20, 1001 / 1010, 0.995], rtol=1e-6)


def test_classifier_step_sharded_equals_single_device():
    config = tiny_config()
    config.model.kind = "classifier"
    config.model.learn_sigma = False
    config.model.pool = "adaptive"
    config.training.ema_rates = ()
    config.training.label_dropout = 0.0  # a classifier trains on every label
    state1, m1, _ = run_steps(config, jax.devices()[:1], trainer="classifier")
    state8, m8, _ = run_steps(config, jax.devices(), trainer="classifier")
    assert_trees_close(state8.params, state1.params)
    for k in ("loss", "acc@1", "acc@5", "loss_q2"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
    assert 0.0 <= m8["acc@1"] <= m8["acc@5"] <= 1.0


def test_learning_rate_schedule_warmup_and_anneal():
    from diffusion_jax.training import learning_rate_schedule

    config = tiny_config()
    config.optim.lr = 1.0
    config.optim.warmup_steps = 10
    config.optim.anneal_lr = True
    sched = learning_rate_schedule(config.optim, 100)
    np.testing.assert_allclose(
        [float(sched(s)) for s in (0, 5, 10, 50, 100)], [0.0, 0.5 * 0.95, 0.9, 0.5, 0.0], atol=1e-6
    )


def test_label_dropout_replaces_that_share_of_labels_by_the_null_class():
    from diffusion_jax.training import steps

    labels = jax.numpy.asarray(np.arange(100_000) % 10, jax.numpy.int32)
    got = np.asarray(steps.drop_labels(labels, jax.random.key(0), 0.3, 10))
    dropped = got == 10
    # SE of the share: sqrt(0.3 * 0.7 / 1e5) = 0.0014; 4 SE allowed.
    assert abs(dropped.mean() - 0.3) < 0.006, dropped.mean()
    np.testing.assert_array_equal(got[~dropped], np.asarray(labels)[~dropped])
    assert set(np.unique(got)) <= set(range(11))
    np.testing.assert_array_equal(steps.drop_labels(labels, jax.random.key(0), 0.0, 10), labels)
    other = np.asarray(steps.drop_labels(labels, jax.random.key(1), 0.3, 10))
    assert (other != got).mean() > 0.3  # keyed: another key drops other labels


def test_label_dropout_is_checked_and_resuming_with_another_is_refused():
    config = tiny_config()
    assert config.model.label_dropout == LABEL_DROPOUT  # one reference, two sections
    checks.check_training_config(config, "diffusion", 8)

    def fails(match, config, trainer="diffusion"):
        with pytest.raises(ValueError, match=match) as info:
            checks.check_training_config(config, trainer, 8)
        assert "\n" not in str(info.value)

    fails(r"training\.label_dropout must be in \[0, 1\), got 1\.0", tiny_config(label_dropout=1.0))
    unconditional = tiny_config()
    unconditional.model.num_classes = None
    unconditional.data.class_cond = False
    fails(r"label_dropout=0\.25 needs a class-conditional model: set model\.num_cl", unconditional)
    classifier = tiny_config()
    classifier.model.kind = "classifier"
    fails(r"label_dropout=0\.25 is for diffusion models", classifier, "classifier")
    saved = json.loads(config.to_json_best_effort())
    with pytest.raises(ValueError, match=r"training\.label_dropout \(run: 0\.25, now: 0\.1\)"):
        checks.check_resume_config(
            saved, json.loads(tiny_config(label_dropout=0.1).to_json_best_effort()), "DIR"
        )


def test_a_run_saved_before_a_field_existed_resumes_while_the_field_is_off():
    saved = {"training": {"num_steps": 10, "batch_size": 8}}
    for off in (0.0, False, None, ""):
        now = {"training": {"num_steps": 20, "batch_size": 8, "new_field": off}}
        assert checks.config_differences(saved, now) == []
    now = {"training": {"num_steps": 10, "batch_size": 8, "new_field": 0.1}}
    assert checks.config_differences(saved, now) == [
        "training.new_field (run: '<absent>', now: 0.1)"
    ]


def test_a_nonfinite_step_then_a_finite_one_equals_the_finite_one_alone(setup8):
    """The skipped step leaves params, EMA copies, optimiser state (Adam's moments and
    count) and the sampler's history as they were: after it, a finite step gives what
    that finite step gives from the untouched initial state (at the same step index, as
    the step's keys are fold_in(base_key, step))."""
    config, mesh, setup = setup8

    def put(batch):
        return jax.device_put(batch, parallel.data_sharding(mesh))

    bad, good = batch_for(config, 0), batch_for(config, 1)
    bad["image"][0, 0, 0, 0] = np.nan
    state, metrics = setup.train_step(setup.init(), put(bad))
    assert not np.isfinite(float(metrics["loss"]))
    state, _ = setup.train_step(state, put(good))
    after_skip = jax.device_get(state)

    alone = setup.init().replace(step=jax.device_put(np.int32(1), setup.shardings.step))
    alone, _ = setup.train_step(alone, put(good))
    alone = jax.device_get(alone)
    assert int(after_skip.step) == int(alone.step) == 2
    for name in ("params", "ema", "opt_state", "sampler"):
        assert_trees_close(getattr(after_skip, name), getattr(alone, name), rtol=0, atol=0)
    # The skipped step is counted, the finite one resets the run of skips.
    assert after_skip.nonfinite.tolist() == [1, 0] and alone.nonfinite.tolist() == [0, 0]
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(alone.params), jax.tree.leaves(jax.device_get(setup.init()).params)
        )
    )
    assert moved > 1e-3  # the finite step really moved the parameters


def test_ema_warmup_through_the_train_step_is_the_closed_form():
    # e_{k+1} = d_k e_k + (1 - d_k) p_{k+1}, d_k = min(r, (1 + k) / (10 + k)), e_0 = p_0:
    # d_0 = 1/10 and d_1 = 2/11 (below both rates), d_2 = 3/12.
    config = tiny_config(ema_warmup=True)
    mesh = parallel.create_mesh(jax.devices()[:1])
    setup = loop.create_setup(config, mesh, "diffusion")
    state = setup.init()
    ps = [jax.device_get(state.params)]
    for i in range(3):
        batch = jax.device_put(batch_for(config, i), parallel.data_sharding(mesh))
        state, _ = setup.train_step(state, batch)
        ps.append(jax.device_get(state.params))
    for rate in (0.9, 0.99):
        want = ps[0]
        for k, d in enumerate((1 / 10, 2 / 11, 3 / 12)):
            want = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, want, ps[k + 1])
        got = jax.device_get(state.ema)[ema_key(rate)]
        assert_trees_close(got, want, rtol=1e-5, atol=1e-7)
        # Without the warm-up the copy would be r e + (1 - r) p: far from this.
        plain = ps[0]
        for k in range(3):
            plain = jax.tree.map(lambda e, p, r=rate: r * e + (1 - r) * p, plain, ps[k + 1])
        gap = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(want))
        )
        assert gap > 1e-4


def test_label_dropout_draw_is_independent_of_the_t_and_noise_draws():
    """Through the real diffusion step with a stand-in model that reports what it gets:
    which labels were dropped does not correlate with t or with the noise (drawing the
    mask from the t or the noise key would: partitionable threefry gives element i the
    same bits whatever the shape, so the mask would be a threshold of the noise)."""
    import functools

    import ml_collections
    import optax

    from diffusion_jax.diffusion import create_diffusion
    from diffusion_jax.diffusion.resample import create_schedule_sampler
    from diffusion_jax.training import steps
    from diffusion_jax.training.state import create_train_state

    seen = []

    def apply_fn(variables, x_t, t, *, train, rngs, y):
        del train, rngs
        jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]), x_t, t, y)
        return x_t * variables["params"]["w"]

    diffusion = create_diffusion(
        ml_collections.ConfigDict(
            {
                "steps": 100,
                "learn_sigma": False,
                "noise_schedule": "linear",
                "rescale_timesteps": False,
            }
        )
    )
    optimizer = optax.sgd(0.1)
    settings = steps.StepSettings(
        apply_fn=apply_fn,
        optimizer=optimizer,
        lr_schedule=lambda s: 0.1,
        ema_rates=(),
        num_microbatches=1,
        num_timesteps=100,
        label_dropout=0.5,
        null_label=10,
    )
    sampler = create_schedule_sampler("uniform", 100)
    step = jax.jit(
        functools.partial(
            steps.diffusion_train_step, settings=settings, diffusion=diffusion, sampler=sampler
        )
    )
    state = create_train_state({"w": jnp_ones()}, optimizer, (), sampler.init_state(), seed=3)
    b = 1024
    batch = {"image": np.zeros((b, 2, 2, 1), np.float32), "label": np.zeros((b,), np.int32)}
    for _ in range(8):
        state, _ = step(state, batch)
    masks, ts, first_noise, per_example_noise = [], [], [], []
    # The paper's linear schedule for T = 100: betas from 1e-3 to 0.2.
    alphas = np.sqrt(1.0 - np.cumprod(1.0 - np.linspace(1e-3, 0.2, 100)))
    for x_t, t, y in seen:
        t = np.asarray(t).astype(np.int64)  # no rescaling: the model gets t itself
        noise = x_t / alphas[t][:, None, None, None]  # x_0 = 0: x_t = sqrt(1 - abar) noise
        masks.append(y == 10)
        ts.append(t)
        first_noise.append(noise.reshape(-1)[:b])  # the elements sharing the mask's counters
        per_example_noise.append(noise[:, 0, 0, 0])
    mask = np.concatenate(masks).astype(np.float64)
    assert len(seen) == 8 and abs(mask.mean() - 0.5) < 0.03
    n = len(mask)
    for name, values in (
        ("t", np.concatenate(ts)),
        ("noise[:B]", np.concatenate(first_noise)),
        ("noise[:, 0]", np.concatenate(per_example_noise)),
    ):
        corr = np.corrcoef(mask, values.astype(np.float64))[0, 1]
        assert abs(corr) < 5 / np.sqrt(n), (name, corr)  # 5 standard errors


def jnp_ones():
    return jax.numpy.ones(())


def test_an_old_fsdp_run_resumes_under_any_mesh():
    """A config.json of a run saved with training.fsdp=True and no mesh section resumes
    under a config with a mesh (the mesh and the FSDP fields may change on resume)."""
    old = json.loads(tiny_config(fsdp=True).to_json_best_effort())
    del old["mesh"]
    for fsdp, legacy in ((1, False), (4, False), (-1, False), (1, True)):
        now = tiny_config(mesh_fsdp=fsdp, fsdp=legacy, fsdp_min_size=256)
        assert checks.config_differences(old, json.loads(now.to_json_best_effort())) == []
    changed = tiny_config(mesh_fsdp=4)
    changed.optim.lr = 0.5
    assert checks.config_differences(old, json.loads(changed.to_json_best_effort())) == [
        "optim.lr (run: 0.01, now: 0.5)"
    ]


def test_mesh_config_is_resolved_and_bad_values_fail_in_one_line(caplog):

    def shape(**kw):
        config = tiny_config()
        for key, value in kw.items():
            section, field = key.split("_")
            config[section][field] = value
        return dict(parallel.create_mesh_from_config(config).shape)

    assert shape() == {"data": 8, "fsdp": 1}
    assert shape(mesh_data=1, mesh_fsdp=-1) == {"data": 1, "fsdp": 8}
    assert shape(mesh_fsdp=4) == {"data": 2, "fsdp": 4}
    assert shape(mesh_data=4, mesh_fsdp=-1) == {"data": 4, "fsdp": 2}
    assert shape(mesh_data=2, mesh_fsdp=4) == {"data": 2, "fsdp": 4}
    assert "deprecated" not in caplog.text
    assert shape(training_fsdp=True) == {"data": 1, "fsdp": 8}  # the deprecated spelling
    assert "training.fsdp=True is deprecated" in caplog.text
    assert shape(training_fsdp=True, mesh_data=2) == {"data": 2, "fsdp": 4}
    assert parallel.mesh_axes({"training": {"fsdp": True}}) == {"data": 1, "fsdp": -1}
    assert parallel.mesh_axes({"training": {"fsdp": False}}) == {"data": -1, "fsdp": 1}
    bad = {
        "mesh.data=0 must be a positive device count or -1": dict(mesh_data=0),
        "mesh.fsdp=-2 must be a positive device count or -1": dict(mesh_fsdp=-2),
        "mesh.data=-1 and mesh.fsdp=-1: at most one": dict(mesh_fsdp=-1, mesh_data=-1),
        r"mesh.fsdp=3 does not divide the 8 devices; set --config.mesh.fsdp to one of "
        r"\[1, 2, 4, 8\]": dict(mesh_fsdp=3),
        "mesh.data=2 x mesh.fsdp=2 = 4 devices, but there are 8": dict(mesh_data=2, mesh_fsdp=2),
        r"training.fsdp=True \(deprecated: the old spelling of mesh.fsdp=-1\) contradicts "
        "mesh.fsdp=4": dict(training_fsdp=True, mesh_fsdp=4),
    }
    for match, kw in bad.items():
        with pytest.raises(ValueError, match=match) as info:
            shape(**kw)
        assert "\n" not in str(info.value)
