"""Quickstart: the paper in miniature on the built-in `mnist_5k` digits (16x16), on a CPU.

One command trains a small class-conditional ADM (learned sigmas, hybrid loss, with
label dropout for classifier-free guidance) and a small noise-aware classifier, then
samples with and without classifier guidance (and with classifier-free guidance) and
reports what the paper reports, in about 15 minutes on a 2-core CPU; nothing to
download:
  python -m launch.quickstart --workdir=quickstart_out
The diffusion model alone (the top level is its config):
  python -m launch.train --config=configs/quickstart.py --workdir=/tmp/quickstart_diffusion

The top level is the diffusion model's config (so `launch.train` takes it too);
`classifier` and `clean_classifier` hold the two classifiers' network, optimiser and
training sections (they share this config's `diffusion` and `data`, so the noise
schedule and the image size live in one place); `quickstart` holds the job's own
settings. On a GPU or TPU the values under `quickstart.accelerator` replace the
training lengths and sample counts (set `quickstart.scale_on_accelerator=False` to keep
the CPU values).
"""

import ml_collections

from configs import base


def _classifier_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A small noise-aware classifier: the UNet's encoder half with attention pooling."""
    model = base.get_base_config().model
    model.kind = "classifier"
    model.image_size = config.model.get_ref("image_size")  # linked: one image size
    model.num_classes = config.model.get_ref("num_classes")  # linked: one class count
    model.num_channels = 32
    model.num_res_blocks = 1
    model.channel_mult = (1, 2, 2)
    model.attention_resolutions = (4,)
    model.num_head_channels = 32
    model.resblock_updown = True
    model.pool = "attention"
    model.dtype = "auto"
    return model


def _classifier_section(
    config: ml_collections.ConfigDict, num_steps: int, noised: bool
) -> ml_collections.ConfigDict:
    """A classifier's model, optim and training sections (diffusion and data are shared)."""
    section = ml_collections.ConfigDict()
    section.model = _classifier_model(config)
    section.optim = base.get_base_config().optim
    section.optim.lr = 1e-3
    section.optim.weight_decay = 0.05
    section.optim.anneal_lr = True
    section.training = training = base.get_base_config().training
    training.num_steps = num_steps
    training.batch_size = 64
    training.ema_rates = ()  # as the paper's classifiers
    training.log_every = 50
    training.checkpoint_every = 250
    training.noised = noised
    training.eval_every = num_steps  # held-out accuracy (per t-quartile) at the end
    training.eval_num_samples = 500  # the whole test split
    return section


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the quickstart config (`arg` is accepted and must be empty)."""
    if arg:
        raise ValueError(f"configs/quickstart.py takes no variant, got {arg!r}.")
    config = base.get_base_config()
    model = config.model
    model.image_size = 16
    model.num_channels = 32
    model.num_res_blocks = 1
    model.channel_mult = (1, 2, 2)
    model.attention_resolutions = (8,)
    model.num_heads = 2
    model.resblock_updown = True
    model.num_classes = 10
    model.learn_sigma = True  # with use_kl=False: the paper's hybrid loss
    # 4 channels a GroupNorm group, as in the paper's narrowest (128-wide) models. With
    # the paper code's fixed 32 groups this 32-wide model would normalise every channel
    # on its own, removing each channel's spatial mean in every norm (the output head's
    # included): it could not carry an image's colour, and its samples came out with
    # random background tints (bench/RESULTS.md, quickstart study).
    model.norm_groups = 8

    diffusion = config.diffusion
    diffusion.noise_schedule = "cosine"

    data = config.data
    data.dataset = "mnist_5k"
    data.class_cond = True
    data.random_flip = False  # digits are not mirror-symmetric
    data.eval_split = "test"

    # The recipe of the colour study (bench/RESULTS.md): more, smaller steps at a higher
    # rate, annealed to 0 (the paper code's --anneal_lr). Batch 32 gives more learning
    # per image and more images per second on a CPU than batch 64; 1800 steps take about
    # as long as 700 at batch 64 did, and the backgrounds come out black.
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 50
    config.optim.anneal_lr = True
    training = config.training
    training.num_steps = 1800
    training.batch_size = 32
    training.ema_rates = (0.995,)
    training.ema_warmup = True  # a short run: early EMA copies must not keep the init
    training.label_dropout = 0.1  # classifier-free guidance: a null-label row
    # One example in 32 at t = 0, where the vb term is the decoder's NLL L_0: uniform t
    # reaches it 58 times in 1800 steps, its learned variance stayed near the t = 1
    # value, and L_0 was over half the bits/dim (0.69 of 1.26). With this share: 0.35 of
    # 0.97 bits/dim (bench/RESULTS.md). Samplers never use the variance at t = 0, but
    # the pull there leaks into the shared variance output at the t they use: over three
    # seeds the unguided samples came out worse (FD 7.9 vs 3.0; RESULTS.md, "Seeds").
    training.decoder_share = 1 / 32
    training.log_every = 50
    training.checkpoint_every = 300

    sampling = config.sampling
    sampling.num_samples = 100  # replaced by quickstart.samples_per_class x classes
    sampling.batch_size = 100
    sampling.method = "ancestral"
    sampling.timestep_respacing = 100
    sampling.classifier_scale = 0.0  # the guided run uses quickstart.classifier_scale

    config.classifier = _classifier_section(config, 600, noised=True)
    # The judge of the samples: trained on clean training images only, never on samples
    # or on noised inputs, and separate from the guidance classifier.
    config.clean_classifier = _classifier_section(config, 300, noised=False)

    job = config.quickstart = ml_collections.ConfigDict()
    job.samples_per_class = 10  # one grid row per class
    job.classifier_scale = 4.0  # the guided run's sampling.classifier_scale
    job.cfg_scale = 3.0  # the classifier-free run's sampling.cfg_scale
    job.bpd_num_images = 50  # test images (5 per class) for bits/dim (1000 steps each)
    job.bpd_batch_size = 50
    # The paper's guidance study (launch.sweep on the clean classifier's features):
    # --config.quickstart.guidance_study=True. Nine sample sets of samples_per_class x 10
    # images at study_steps ancestral steps (0 = sampling.timestep_respacing).
    job.guidance_study = False
    job.study_classifier_scales = (0.0, 1.0, 2.0, 4.0, 8.0)
    job.study_cfg_scales = (1.0, 2.0, 3.0, 5.0)
    job.study_steps = 25
    job.scale_on_accelerator = True
    # On a CPU host the job splits its batches over this many host devices (one thread
    # each): 1.5x the training steps/s of one device on a 2-core CPU (bench/RESULTS.md).
    # 2 divides every batch here (32, 100, 50). Ignored when XLA_FLAGS or
    # JAX_NUM_CPU_DEVICES already set a device count, and on GPU/TPU.
    job.cpu_devices = 2
    accel = job.accelerator = ml_collections.ConfigDict()
    accel.num_steps = 8000
    accel.batch_size = 128
    accel.classifier_num_steps = 3000
    accel.samples_per_class = 50
    accel.bpd_num_images = 500
    return config
