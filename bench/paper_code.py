"""The paper's code (guided-diffusion-sdk, PyTorch) at a config of ours, timed side by side.

Everything here calls the paper code's classes (UNetModel, EncoderUNetModel, its
GaussianDiffusion / SpacedDiffusion, MixedPrecisionTrainer, update_ema); only the glue
of its training and sampling scripts (one train step, the classifier guidance cond_fn)
is restated. torch is imported lazily, so the JAX benchmarks run without it.

Modes: 'eager' = the code as shipped (fp16 weights and loss scaling when `fp16`, as its
ImageNet flags use on a GPU; float32 otherwise); 'compile' = the same model under
torch.compile with bf16 autocast (ANCHORS.md's second column).
"""

from __future__ import annotations

import statistics
import time
from typing import Any


def _unet_kwargs(model_config: Any, resolved: dict) -> dict:
    size = resolved["image_size"]
    return dict(
        image_size=size,
        in_channels=resolved["in_channels"],
        model_channels=resolved["model_channels"],
        num_res_blocks=resolved["num_res_blocks"],
        attention_resolutions=tuple(size // r for r in resolved["attention_resolutions"]),
        channel_mult=tuple(resolved["channel_mult"]),
        conv_resample=resolved["conv_resample"],
        num_heads=resolved["num_heads"],
        num_head_channels=resolved["num_head_channels"],
        use_scale_shift_norm=resolved["use_scale_shift_norm"],
        resblock_updown=resolved["resblock_updown"],
        use_new_attention_order=resolved["use_new_attention_order"],
        dropout=resolved["dropout"],
    )


def build(config: Any, classifier_config: Any, device: str, fp16: bool):
    """The paper code's model, classifier and diffusions for our configs."""
    from guided_diffusion import script_util
    from guided_diffusion import unet as gd_unet

    from diffusion_jax.models import validate_model_config

    m = validate_model_config(config.model)
    model = gd_unet.UNetModel(
        out_channels=m["out_channels"],
        num_classes=m["num_classes"],
        num_heads_upsample=m["num_heads_upsample"],
        use_fp16=fp16,
        **_unet_kwargs(config.model, m),
    )
    c = validate_model_config(classifier_config.model)
    classifier = gd_unet.EncoderUNetModel(
        out_channels=c["num_classes"], pool=c["pool"], use_fp16=fp16, **_unet_kwargs(None, c)
    )
    if fp16:
        model.convert_to_fp16()
        classifier.convert_to_fp16()
    d = config.diffusion

    def diffusion(respacing):
        return script_util.create_gaussian_diffusion(
            steps=d.steps,
            learn_sigma=d.learn_sigma,
            sigma_small=d.sigma_small,
            noise_schedule=d.noise_schedule,
            use_kl=d.use_kl,
            predict_xstart=d.predict_xstart,
            rescale_timesteps=d.rescale_timesteps,
            rescale_learned_sigmas=d.rescale_learned_sigmas,
            timestep_respacing=str(respacing),
        )

    return model.to(device), classifier.to(device), diffusion


def _timed(fn, repeats: int, warmup: int, sync) -> tuple[float, float]:
    """(first call's seconds, median seconds of `repeats` calls after `warmup`)."""
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def measure(
    config: Any,
    classifier_config: Any,
    *,
    parts: tuple[str, ...],
    train_batch: int,
    sample_batch: int,
    mode: str,
    fp16: bool,
    repeats: int,
    warmup: int,
    scale: float,
) -> list[dict]:
    """Times the paper code's train step, sampling forward and guided step.

    Returns:
      Rows {'part', 'impl', 'batch', 'step_s', 'first_s', 'peak_bytes'}.
    """
    import torch
    import torch.nn.functional as F
    from guided_diffusion.fp16_util import MixedPrecisionTrainer
    from guided_diffusion.nn import update_ema

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled = mode == "compile"
    fp16 = fp16 and not compiled and device == "cuda"
    torch.manual_seed(0)
    model, classifier, make_diffusion = build(config, classifier_config, device, fp16)
    impl = "paper torch.compile+bf16" if compiled else f"paper eager {'fp16' if fp16 else 'fp32'}"
    if compiled:
        model_fn, classifier_fn = torch.compile(model), torch.compile(classifier)
    else:
        model_fn, classifier_fn = model, classifier
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=compiled)
    size, ch = config.model.image_size, config.model.in_channels
    num_classes = config.model.num_classes
    gen = torch.Generator(device="cpu").manual_seed(0)

    def inputs(b):
        x = (torch.rand((b, ch, size, size), generator=gen) * 2 - 1).to(device)
        y = None
        if num_classes is not None:
            y = torch.randint(0, num_classes, (b,), generator=gen).to(device)
        return x, y

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def peak():
        return torch.cuda.max_memory_allocated() if device == "cuda" else None

    rows = []

    def record(part, batch, fn):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first, step = _timed(fn, repeats, warmup, sync)
        rows.append(dict(part=part, impl=impl, batch=batch, step_s=step, first_s=first,
                         peak_bytes=peak()))  # fmt: skip

    if "train" in parts:
        diffusion = make_diffusion("")
        model.train()
        trainer = MixedPrecisionTrainer(model=model, use_fp16=fp16, fp16_scale_growth=1e-3)
        opt = torch.optim.AdamW(
            trainer.master_params, lr=config.optim.lr, weight_decay=config.optim.weight_decay
        )
        ema = [p.detach().clone() for p in trainer.master_params]
        x, y = inputs(train_batch)
        kwargs = {} if y is None else {"y": y}

        def train_step():
            # The paper's TrainLoop.run_step: forward_backward, optimize, EMA.
            trainer.zero_grad()
            t = torch.randint(0, diffusion.num_timesteps, (train_batch,), device=device)
            with autocast:
                losses = diffusion.training_losses(model_fn, x, t, model_kwargs=kwargs)
            trainer.backward(losses["loss"].mean())
            if trainer.optimize(opt):
                update_ema(ema, trainer.master_params, rate=config.training.ema_rates[0])

        record("train", train_batch, train_step)
        del trainer, opt, ema
        model.eval()

    x, y = inputs(sample_batch)
    kwargs = {} if y is None else {"y": y}
    t = torch.full((sample_batch,), config.diffusion.steps // 2, device=device)
    if "forward" in parts:

        def forward():
            with torch.no_grad(), autocast:
                return model_fn(x, t, **kwargs)

        record("forward", sample_batch, forward)

    if "guided" in parts:
        respacing = config.sampling.timestep_respacing
        diffusion = make_diffusion(respacing)
        labels = y if y is not None else torch.zeros((sample_batch,), dtype=torch.long)
        t_spaced = torch.full((sample_batch,), diffusion.num_timesteps // 2, device=device)

        def cond_fn(x_t, t_model, y=None):
            # The paper's classifier_sample.py guidance: s * grad log softmax(logits)[y].
            with torch.enable_grad(), autocast:
                x_in = x_t.detach().requires_grad_(True)
                log_probs = F.log_softmax(classifier_fn(x_in, t_model).float(), dim=-1)
                selected = log_probs[range(len(log_probs)), labels.view(-1)]
                return torch.autograd.grad(selected.sum(), x_in)[0] * scale

        def guided_step():
            with torch.no_grad(), autocast:
                return diffusion.p_sample(
                    model_fn, x, t_spaced, cond_fn=cond_fn, model_kwargs=kwargs
                )["sample"]

        record("guided", sample_batch, guided_step)
    return rows


def release_memory() -> None:
    """Hands the paper code's cached CUDA memory back (JAX runs next in the process)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
