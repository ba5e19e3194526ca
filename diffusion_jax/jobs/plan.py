"""Sizing a run before it runs: compiled per-device memory, FLOPs, time and cost.

`plan(config, num_devices)` (behind `launch.plan`) compiles without running anything:
parameters, optimiser state and batches are abstract (`jax.ShapeDtypeStruct` with
shardings), so a paper model is never materialised. FLOPs are the analytic count of
../shared/ANCHORS.md and bench/.

What is exact and what is an estimate: parameter, EMA and optimiser-state bytes per
device follow from the shardings and are the same on every backend; temporaries
(activations kept for the backward pass, gradients, scratch) come from the compiler of
the backend the plan ran on, and an accelerator's compiler fuses and schedules
differently (README: Plan a run).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import aot, models, parallel
from diffusion_jax.checkpoints import abstract_params
from diffusion_jax.sampling import inputs as sampling_inputs
from diffusion_jax.sampling.sharded import compile_program, sampling_program
from diffusion_jax.training import aot as training_aot
from diffusion_jax.training import loop

# The bf16 matmul rate the anchors' H200 measured (ANCHORS.md): the default peak.
H200_BF16_TFLOPS = 782.0
# No measured MFU of this project's step on an accelerator yet (bench/RESULTS.md has CPU
# figures only): the default is an assumption, near the paper code's 25-27% on the H200
# (ANCHORS.md) and below the 43% of its torch.compile + bf16 run. Change it with --mfu.
ASSUMED_MFU = 0.3
FID_SAMPLES = 50_000


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to lay out a run: the mesh, remat and gradient accumulation."""

    fsdp: bool = False
    remat: bool = False
    microbatch: int = -1  # -1 = the whole per-step batch at once

    @property
    def name(self) -> str:
        parts = ["fsdp" if self.fsdp else "data-parallel"]
        if self.remat:
            parts.append("remat")
        if self.microbatch > 0:
            parts.append(f"microbatch {self.microbatch}")
        return " + ".join(parts)


TABLE_VARIANTS = (Variant(), Variant(fsdp=True), Variant(fsdp=True, remat=True))


def default_variants(config: Any, num_devices: int) -> tuple[Variant, ...]:
    """The table's three variants, and FSDP + remat + a quarter-batch microbatch."""
    batch = int(config.training.batch_size)
    micro = batch // 4
    extra = ()
    if micro and micro % num_devices == 0 and batch % micro == 0:
        extra = (Variant(fsdp=True, remat=True, microbatch=micro),)
    return TABLE_VARIANTS + extra


def trainer_of(config: Any) -> str:
    """The training loop of the config's model kind (its registry entry)."""
    return models.model_spec(models.validate_model_config(config.model)["kind"]).trainer


def variant_config(config: Any, variant: Variant) -> ml_collections.ConfigDict:
    """`config` laid out as `variant` (mesh.data/fsdp, model.remat, training.microbatch).

    A `model.dtype` of 'auto' becomes bfloat16, the accelerators' compute dtype.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.data, config.mesh.fsdp = (1, -1) if variant.fsdp else (-1, 1)
    config.training.fsdp = False
    config.model.remat = variant.remat
    config.training.microbatch = variant.microbatch
    if config.model.get("dtype", "auto") == "auto":
        # What the run computes in on its accelerator, also when planned on a CPU host
        # (where 'auto' would mean float32 and double the activations).
        config.model.dtype = "bfloat16"
    return config


def compile_train_variant(config: Any, devices, variant: Variant) -> dict[str, Any]:
    """Compiles the train step of `config` laid out as `variant` on `devices`.

    Returns:
      A row: variant, total/argument/output/alias/temp bytes per device, `state_bytes`
      (parameters + EMA + optimiser state per device, exact), compile seconds.
    """
    config = variant_config(config, variant)
    mesh = parallel.create_mesh_from_config(config, devices)
    parallel.check_global_batch(int(config.training.batch_size), mesh)
    setup = loop.create_setup(config, mesh, trainer_of(config))
    _, report = training_aot.compile_train_step(config, mesh, setup, device_memory_gb=0.0)
    return {
        "variant": variant.name,
        "devices": len(devices),
        "state_bytes": aot.sharded_bytes(setup.abstract_state),
        "param_bytes": aot.sharded_bytes(setup.abstract_state.params),
        **_report_row(report),
    }


def _report_row(report: aot.MemoryReport) -> dict[str, Any]:
    sizes = ("total_bytes", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
    return {**{k: getattr(report, k) for k in sizes}, "compile_s": report.compile_seconds}


# ----- FLOPs ---------------------------------------------------------------------------


def forward_flops(config: Any) -> float:
    """Analytic FLOPs of one forward pass of one image (ANCHORS.md's count)."""
    settings = models.validate_model_config(config.model)
    spec = models.model_spec(settings["kind"])
    module = spec.build(settings)
    args, kwargs = spec.example_inputs(settings, 1, config.data.get("low_res_size"))
    apply = lambda p, a, kw: module.apply({"params": p}, *a, **kw)  # noqa: E731
    return aot.matmul_flops(apply, abstract_params(config.model), args, kwargs)


def train_step_flops(config: Any) -> float:
    """FLOPs of one train step: 3 forward passes an image (forward + backward)."""
    return 3.0 * forward_flops(config) * int(config.training.batch_size)


# ----- sampling --------------------------------------------------------------------------


def _classifier_config(config: Any):
    spec = config.sampling.get("classifier_config", "") or ""
    if not spec or not float(config.sampling.get("classifier_scale", 0.0) or 0.0):
        return None
    return sampling_inputs.load_config_spec(spec, "sampling.classifier_config")


def compile_sampling(config: Any, devices) -> dict[str, Any]:
    """Compiles the config's sampling program (guided when it names a classifier).

    Parameters replicated, `sampling.batch_size` rows split over every device.
    """
    mesh = parallel.create_mesh(devices, data=-1, fsdp=1)
    cls_config = _classifier_config(config)
    classifier = None if cls_config is None else models.create_classifier(cls_config.model)
    program = sampling_program(config, mesh, classifier=classifier)
    b = int(config.sampling.batch_size)
    parallel.check_global_batch(b, mesh)
    low = int(config.data.get("low_res_size", 0) or 0)
    _, report = compile_program(
        program,
        config.model,
        b,
        classifier_config=None if cls_config is None else cls_config.model,
        labels=program.class_conditional or classifier is not None,
        low_res=((low, low, program.image_shape[-1]), jnp.uint8) if low else None,
    )
    steps = int(program.diffusion.num_timesteps)
    per_eval = forward_flops(config)
    if program.null_label is not None:
        per_eval *= 2
    guided = 0.0 if cls_config is None else 3.0 * forward_flops(cls_config)
    return {
        "variant": "guided sampling" if classifier is not None else "sampling",
        "devices": len(devices),
        "batch": b,
        "steps": steps,
        "flops_per_image": steps * (per_eval + guided),
        **_report_row(report),
    }


# ----- the plan ----------------------------------------------------------------------------


def days(flops: float, num_devices: int, peak_tflops: float, mfu: float) -> float:
    return flops / (num_devices * peak_tflops * 1e12 * mfu) / 86400.0


def plan(
    config: Any,
    num_devices: int,
    *,
    device_memory_gb: float = 0.0,
    mfu: float = ASSUMED_MFU,
    peak_tflops: float = H200_BF16_TFLOPS,
    variants: tuple[Variant, ...] | None = None,
    sampling: bool = True,
) -> dict[str, Any]:
    """Compiles `config`'s steps for `num_devices` devices and sizes the run.

    Args:
      config: a paper config (or any training config).
      num_devices: devices of the default backend to compile for (the first N).
      device_memory_gb: GiB per device to check the variants against (0 = what the
        backend reports; none on CPU).
      mfu: model FLOPs utilisation assumed for the time figures.
      peak_tflops: the device's peak bf16 matmul rate.
      variants: layouts to compile (default `default_variants`).
      sampling: also compile the sampling program (diffusion configs).

    Returns:
      A dict: `rows` (one per variant, with `fits`), `sampling` (or None), FLOPs and times.

    Raises:
      ValueError: bad device count, memory or MFU, or a batch that does not split.
    """
    available = jax.devices()
    if not 0 < num_devices <= len(available):
        raise ValueError(
            f"--devices={num_devices}: this host has {len(available)} {jax.default_backend()} "
            "devices (on a CPU host launch.plan fakes them; on a pod use at most the real count)."
        )
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"--mfu={mfu} must be in (0, 1] (e.g. 0.3 for 30%).")
    if peak_tflops <= 0:
        raise ValueError(f"--peak_tflops={peak_tflops} must be positive.")
    limit = aot.device_memory_bytes(device_memory_gb)
    devices = available[:num_devices]
    variants = default_variants(config, num_devices) if variants is None else variants
    rows = []
    for variant in variants:
        row = compile_train_variant(config, devices, variant)
        row["fits"] = None if limit is None else row["total_bytes"] <= limit
        rows.append(row)
    step_flops = train_step_flops(config)
    num_steps = int(config.training.num_steps)
    out = {
        "config_batch": int(config.training.batch_size),
        "num_devices": num_devices,
        "limit_bytes": limit,
        "rows": rows,
        "step_flops": step_flops,
        "forward_flops": forward_flops(config),
        "mfu": mfu,
        "peak_tflops": peak_tflops,
        "step_s": days(step_flops, num_devices, peak_tflops, mfu) * 86400.0,
        "num_steps": num_steps,
        "train_days": days(step_flops * num_steps, num_devices, peak_tflops, mfu),
        "sampling": None,
    }
    if sampling and trainer_of(config) == "diffusion":
        s = compile_sampling(config, devices)
        s["fits"] = None if limit is None else s["total_bytes"] <= limit
        s["fid_hours"] = 24 * days(
            s["flops_per_image"] * FID_SAMPLES, num_devices, peak_tflops, mfu
        )
        out["sampling"] = s
    return out


def format_plan(name: str, result: dict[str, Any]) -> str:
    """The plan as the text `launch.plan` prints."""
    gib = lambda b: f"{b / aot.GIB:8.2f}"  # noqa: E731
    n = result["num_devices"]
    lines = [
        f"{name}: batch {result['config_batch']} on {n} {jax.default_backend()} devices "
        f"({jax.devices()[0].device_kind}); GiB per device from the compiled programs:",
        f"  {'variant':38s} {'total':>8s} {'state':>8s} {'temps':>8s} {'compile s':>9s}  fits",
    ]
    limit = result["limit_bytes"]
    for r in [*result["rows"], *([result["sampling"]] if result["sampling"] else [])]:
        fits = "n/a" if r["fits"] is None else ("yes" if r["fits"] else "NO")
        state = gib(r["state_bytes"]) if "state_bytes" in r else "       -"
        lines.append(
            f"  {r['variant']:38s} {gib(r['total_bytes'])} {state} {gib(r['temp_bytes'])} "
            f"{r['compile_s']:9.1f}  {fits}"
        )
    memory = "not reported by the backend (pass --device_memory_gb)"
    lines += [
        f"  device memory: {memory if limit is None else f'{limit / aot.GIB:.2f} GiB'}",
        f"FLOPs: {result['forward_flops'] / 1e9:.1f} GFLOPs per forward per image; "
        f"{result['step_flops'] / 1e12:.1f} TFLOPs per train step (3 forwards an image).",
        f"Time at {result['mfu']:.0%} MFU of {result['peak_tflops']:.0f} TFLOP/s per device "
        f"(--mfu, --peak_tflops; no measured MFU of ours on an accelerator yet): "
        f"{result['step_s']:.3f} s per step, {result['train_days']:.1f} days for "
        f"{result['num_steps']:,} steps on {n} devices.",
    ]
    s = result["sampling"]
    if s:
        lines.append(
            f"FID row ({FID_SAMPLES:,} samples, {s['steps']} steps, {s['variant']}): "
            f"{s['flops_per_image'] / 1e12:.1f} TFLOPs per image, {s['fid_hours']:.1f} h on "
            f"{n} devices."
        )
    return "\n".join(lines)


__all__ = ["Variant", "compile_sampling", "compile_train_variant", "format_plan", "plan"]
