"""Model throughput: train step, sampling forward, guided step, whole guided loop (+ paper code).

  PYTHONPATH=. python bench/bench_model.py --config=configs/imagenet256.py \
      --batch=32 --sample_batch=64 --dtype=bfloat16 --paper=eager --json=/tmp/b.json
  PYTHONPATH=. python bench/bench_model.py --config=configs/imagenet64.py:tiny   # CPU

Parts (`--parts`):
  * train: the library's jitted, donated train step (`training.loop.create_setup`, what
    `launch.train` runs) on random batches; images/s, MFU with 3 forward passes an image;
  * forward: one jitted model forward (eval mode) at `--sample_batch`: image-evals/s;
  * guided: one classifier-guided ancestral step (`Diffusion.p_sample` with
    `classifier_cond_fn`: model forward + classifier forward/backward): image-steps/s;
  * loop: a whole `--loop_steps`-step guided sampling batch as one program through
    `sampling.ShardedSampler` (what `launch.sample` runs), one batch to compile, then
    `--loop_batches - 1` timed batches of new indices; reports the loop's time over
    loop_steps x the guided step's, and the compiles after the first batch (must be 0).
Each JAX part reports compile time and count (jax.monitoring), XLA's program memory
(inputs + outputs + scratch, from the compiled program) and the device's running peak
(`memory_stats`, n/a on CPU). FLOPs are counted from the jaxpr (2 x MACs of every conv and
dot), cross-checked against ANCHORS.md for the paper configs. `--paper=eager[,compile]`
times the paper's PyTorch code at the same config and batch in the same run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import benchlib
from diffusion_jax import models, parallel
from diffusion_jax.diffusion import SamplerOptions, classifier_cond_fn, create_diffusion
from diffusion_jax.sampling import inputs as sampling_inputs
from diffusion_jax.sampling.sharded import SamplingProgram, ShardedSampler
from diffusion_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/imagenet64.py:tiny", "Model config.")
_CLASSIFIER = flags.DEFINE_string(
    "classifier_config", "", "Guidance classifier config (default: sampling.classifier_config, "
    "else configs/classifier<size>.py, or classifier64:tiny for 16-pixel tiny configs).",
)  # fmt: skip
_PARTS = flags.DEFINE_list("parts", ["train", "forward", "guided", "loop"], "What to time.")
_BATCH = flags.DEFINE_integer("batch", 0, "Training batch (0: training.batch_size).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 0, "Sampling batch (0: sampling.batch_size).")
_DTYPE = flags.DEFINE_string("dtype", "", "model.dtype override: float32 | bfloat16 | auto.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (the first compiles).")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 0, "Whole-loop steps (0: sampling respacing).")
_LOOP_BATCHES = flags.DEFINE_integer("loop_batches", 2, "Loop batches (the first compiles).")
_PAPER = flags.DEFINE_list("paper", [], "Paper-code modes to time too: eager, compile.")
_PAPER_FP16 = flags.DEFINE_bool("paper_fp16", True, "Paper code eager in fp16 (GPU only).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "MFU denominator (0: 782 on GPU, none on CPU).")
_JSON = flags.DEFINE_string("json", "", "Write all rows and the environment here.")
_LABEL = flags.DEFINE_string("label", "", "Name of this config in the table (default: path).")


def classifier_config_for(config):
    spec = _CLASSIFIER.value or config.sampling.get("classifier_config", "")
    if not spec:
        size = config.model.image_size
        spec = f"configs/classifier{size}.py" if size in (64, 128, 256, 512) else None
        if size == 16:
            spec = "configs/classifier64.py:tiny"
    if not spec:
        raise app.UsageError("no guidance classifier for this config: pass --classifier_config")
    cfg = sampling_inputs.load_config_spec(spec, "--classifier_config")
    cfg.model.dtype = config.model.dtype
    return spec, cfg


def init_params(module, x, t, **kwargs):
    return jax.jit(lambda: module.init(jax.random.key(0), x, t, **kwargs)["params"])()


def forward_flops(module, x, t, **kwargs):
    """Analytic forward FLOPs per image (batch-1 jaxpr count)."""
    one = lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype)  # noqa: E731
    first = {k: v[:1] for k, v in kwargs.items()}
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), x[:1], t[:1], **first))
    return benchlib.matmul_flops(
        lambda p, x, t, **kw: module.apply(p, x, t, **kw), params, one(x), one(t),
        **{k: one(v) for k, v in kwargs.items()},
    )  # fmt: skip


def time_jitted(fn, args, repeats, warmup):
    """Compile (AOT, shared with the call cache), then median time of fn(*args)."""
    with benchlib.CompileCounter() as cc:
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        stats = benchlib.compiled_stats(compiled)
        n_compile = cc.count()
        step_s, _ = benchlib.median_time(lambda: fn(*args), repeats, warmup)
        recompiles = cc.count() - n_compile
    return dict(step_s=step_s, compile_s=compile_s, compiles=n_compile,
                recompiles=recompiles, **stats)  # fmt: skip


def bench_train(config, batch, rng, repeats, warmup):
    config = config.copy_and_resolve_references()
    config.training.batch_size = batch
    config.training.microbatch = -1
    mesh = parallel.create_mesh()
    setup = loop.create_setup(config, mesh, "diffusion")
    state = setup.init()
    size, ch = config.model.image_size, config.model.in_channels
    batches = []
    for _ in range(3):  # a few distinct random batches, never zeros
        b = {"image": benchlib.random_images(rng, (batch, size, size, ch))}
        if config.model.num_classes is not None:
            b["label"] = rng.integers(0, config.model.num_classes, (batch,)).astype(np.int32)
        batches.append(jax.device_put(b, parallel.data_sharding(mesh)))
    with benchlib.CompileCounter() as cc:
        start = time.perf_counter()
        compiled = setup.train_step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - start
        stats = benchlib.compiled_stats(compiled)
        n_compile = cc.count()
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            state, metrics = setup.train_step(state, batches[i % len(batches)])
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        recompiles = cc.count() - n_compile
    loss = float(metrics["loss"])
    del state
    return dict(step_s=float(np.median(times[warmup:])), compile_s=compile_s,
                compiles=n_compile, recompiles=recompiles, loss=loss, **stats)  # fmt: skip


def run_paper(config, cls_config, parts, train_batch, sample_batch):
    """The paper code's rows, measured before any JAX work (on the CPU, XLA's idle thread
    pool slowed the torch steps 3-10x when they ran after the JAX parts)."""
    rows = []
    scale = float(config.sampling.classifier_scale or 1.0)
    for mode in _PAPER.value:
        from bench import paper_code

        rows += paper_code.measure(
            config, cls_config, parts=tuple(p for p in parts if p != "loop"),
            train_batch=train_batch, sample_batch=sample_batch, mode=mode,
            fp16=_PAPER_FP16.value, repeats=_REPEATS.value, warmup=_WARMUP.value, scale=scale,
        )  # fmt: skip
        paper_code.release_memory()
    return rows


def main(argv):
    del argv
    config = _CONFIG.value
    if _DTYPE.value:
        config.model.dtype = _DTYPE.value
    label = _LABEL.value or flags.FLAGS["config"].serialize().split("=", 1)[-1]
    parts = tuple(_PARTS.value)
    rng = np.random.default_rng(0)
    train_batch = _BATCH.value or config.training.batch_size
    sample_batch = _SAMPLE_BATCH.value or config.sampling.batch_size
    backend = jax.default_backend()
    peak = _PEAK.value * 1e12 or (benchlib.H200_BF16_FLOPS if backend == "gpu" else None)
    dtype = models.resolve_compute_dtype(str(config.model.dtype))
    env = benchlib.environment()
    cls_spec, cls_config = classifier_config_for(config)
    model = models.create_model(config.model)
    classifier = models.create_classifier(cls_config.model)
    size, ch = config.model.image_size, config.model.in_channels
    cond = config.model.num_classes is not None
    num_classes = int(cls_config.model.num_classes)
    x = jnp.asarray(benchlib.random_images(rng, (sample_batch, size, size, ch)))
    y = jnp.asarray(rng.integers(0, num_classes, (sample_batch,)).astype(np.int32))
    t = jnp.full((sample_batch,), config.diffusion.steps // 2, jnp.int32)
    kw = {"y": y} if cond else {}
    fwd = forward_flops(model, x, t, **kw)
    fwd_cls = forward_flops(classifier, x, t)
    name = label.rsplit("/", 1)[-1].removesuffix(".py")
    anchor = benchlib.ANCHOR_GFLOPS.get(name)
    rows = []
    common = dict(config=label, dtype=jnp.dtype(dtype).name, impl="diffusion_jax")

    def add(part, batch, res, flops_per_image, unit):
        row = dict(common, part=part, batch=batch, unit=unit, **res)
        row["per_s"] = batch / res["step_s"]
        row["gflops_per_image"] = flops_per_image / 1e9
        row["mfu"] = None if peak is None else row["per_s"] * flops_per_image / peak
        row["peak_bytes"] = benchlib.peak_memory_bytes()
        rows.append(row)
        print(f"[{label}] {part}: {row['per_s']:.2f} {unit}, step {res['step_s']:.4f} s, "
              f"compile {res.get('compile_s', float('nan')):.1f} s", flush=True)  # fmt: skip

    paper_rows = run_paper(config, cls_config, parts, train_batch, sample_batch)
    if "train" in parts:
        res = bench_train(config, train_batch, rng, _REPEATS.value, _WARMUP.value)
        add("train", train_batch, res, 3 * fwd, "img/s")
    params = cls_params = None
    if any(p in parts for p in ("forward", "guided", "loop")):
        params = init_params(model, x[:1], t[:1], **{k: v[:1] for k, v in kw.items()})
        cls_params = init_params(classifier, x[:1], t[:1])
    if "forward" in parts:
        apply = jax.jit(lambda p, x, t, kw: model.apply({"params": p}, x, t, **kw))
        res = time_jitted(apply, (params, x, t, kw), _REPEATS.value, _WARMUP.value)
        add("forward", sample_batch, res, fwd, "img-evals/s")
    scale = float(config.sampling.classifier_scale or 1.0)
    guided_row = None
    if "guided" in parts:
        diffusion = create_diffusion(
            config.diffusion, timestep_respacing=config.sampling.timestep_respacing
        )
        t_spaced = jnp.full((sample_batch,), diffusion.num_timesteps // 2, jnp.int32)

        def guided_step(p, cp, x, t, y, key):
            model_fn = jax.tree_util.Partial(model.apply, {"params": p})
            cond_fn = classifier_cond_fn(classifier.apply, {"params": cp}, scale)
            out = diffusion.p_sample(model_fn, x, t, key, cond_fn=cond_fn,
                                    model_kwargs={"y": y} if cond else {},
                                    cond_kwargs={"y": y})  # fmt: skip
            return out["sample"]

        args = (params, cls_params, x, t_spaced, y, jax.random.key(1))
        step_flops = benchlib.matmul_flops(guided_step, *args) / sample_batch
        res = time_jitted(jax.jit(guided_step), args, _REPEATS.value, _WARMUP.value)
        add("guided", sample_batch, res, step_flops, "img-steps/s")
        guided_row = rows[-1]
    if "loop" in parts:
        steps = _LOOP_STEPS.value or int(config.sampling.timestep_respacing)
        diffusion = create_diffusion(config.diffusion, timestep_respacing=steps)
        program = SamplingProgram(
            diffusion=diffusion, options=SamplerOptions(kind="ancestral"), model=model,
            image_shape=(size, size, ch), mesh=parallel.create_mesh(),
            class_conditional=cond, classifier=classifier,
        )  # fmt: skip
        sampler = ShardedSampler(program, params, jax.random.key(2),
                                 classifier_params=cls_params, classifier_scale=scale)  # fmt: skip
        labels = np.asarray(y)
        times = []
        with benchlib.CompileCounter() as cc:
            for i in range(max(_LOOP_BATCHES.value, 2)):
                if i == 1:
                    first_compiles, compile_s = cc.count(), cc.seconds()
                start = time.perf_counter()
                images, _ = sampler.sample(np.arange(i * sample_batch, (i + 1) * sample_batch),
                                           labels)  # fmt: skip
                times.append(time.perf_counter() - start)
            recompiles = cc.count() - first_compiles
        assert images.dtype == np.uint8 and images.shape[0] == sample_batch
        loop_s = float(np.median(times[1:]))
        res = dict(step_s=loop_s / steps, compile_s=compile_s, compiles=first_compiles,
                   recompiles=recompiles, loop_s=loop_s, loop_steps=steps)  # fmt: skip
        if guided_row is not None:
            res["loop_over_steps"] = loop_s / (steps * guided_row["step_s"])
        add("loop", sample_batch, res, guided_row["gflops_per_image"] * 1e9 if guided_row
            else float("nan"), "img-steps/s")  # fmt: skip
    for prow in paper_rows:
        ours = next((r for r in rows if r["part"] == prow["part"]), None)
        flops = ours["gflops_per_image"] * 1e9 if ours else float("nan")
        prow.update(config=label, dtype="", compile_s=prow.pop("first_s"))
        prow["per_s"] = prow["batch"] / prow["step_s"]
        prow.update(unit=ours["unit"] if ours else "", gflops_per_image=flops / 1e9,
                    mfu=None if peak is None else prow["per_s"] * flops / peak)  # fmt: skip
        if ours:
            ours.setdefault("vs_paper", {})[prow["impl"]] = ours["per_s"] / prow["per_s"]
        rows.append(prow)
    summary = dict(env, config=label, classifier_config=cls_spec, fwd_gflops=fwd / 1e9,
                   classifier_fwd_gflops=fwd_cls / 1e9, anchor_fwd_gflops=anchor)  # fmt: skip
    if _JSON.value:
        benchlib.write_json(_JSON.value, {"summary": summary, "rows": rows})
    print(f"\n{env['device']}, jax {env['jax']}, flax {env['flax']}, {env['date']}; "
          f"{label}: forward {fwd / 1e9:.2f} GFLOPs/image (ANCHORS: {anchor}), "
          f"classifier {fwd_cls / 1e9:.2f}")  # fmt: skip
    print_rows(rows)


def print_rows(rows):
    for r in rows:
        r["peak_gib"] = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30
        r["prog_gib"] = None if r.get("program_bytes") is None else r["program_bytes"] / 2**30
        r["mfu_pct"] = None if r.get("mfu") is None else 100 * r["mfu"]
    benchlib.print_table(rows, [
        ("config", "config", ""), ("part", "part", ""), ("impl", "impl", ""),
        ("dtype", "dtype", ""), ("batch", "batch", "d"), ("per_s", "per s", ".2f"),
        ("unit", "unit", ""), ("step_s", "step s", ".4f"), ("mfu_pct", "MFU %", ".1f"),
        ("compile_s", "compile s", ".1f"), ("compiles", "compiles", "d"),
        ("recompiles", "recompiles", "d"), ("prog_gib", "program GiB", ".2f"),
        ("peak_gib", "peak GiB", ".2f"), ("loop_over_steps", "loop/N*step", ".3f"),
    ])  # fmt: skip


if __name__ == "__main__":
    app.run(main)
