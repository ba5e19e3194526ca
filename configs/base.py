"""Defaults shared by every config; paper configs override only what differs.

Field names follow the paper code's flags (openai/guided-diffusion `script_util.py`) so
its users can move over without a dictionary. Lists are tuples.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the base ConfigDict with every section and field defined."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Facts that two sections need live in one reference each: setting either field
    # (in a config or on the command line) sets both, so they cannot disagree.
    image_size = ml_collections.FieldReference(64, field_type=int)
    learn_sigma = ml_collections.FieldReference(False, field_type=bool)
    # Classifier-free guidance: the probability of training on the null class; > 0
    # gives the model's label embedding its null row (models.null_label).
    label_dropout = ml_collections.FieldReference(0.0, field_type=float)

    # --- Network (UNet, super-resolution UNet, or noise-aware classifier). -----------
    model = config.model = ml_collections.ConfigDict()
    model.kind = "unet"  # 'unet' | 'superres' | 'classifier'
    model.image_size = image_size  # linked: data.image_size
    model.in_channels = 3
    model.num_channels = 128
    model.num_res_blocks = 2
    model.attention_resolutions = (16, 8)  # resolutions (pixels), as the paper's flags
    model.channel_mult = ()  # () = the paper code's default for image_size
    model.num_heads = 4
    model.num_head_channels = -1
    model.num_heads_upsample = -1
    model.use_scale_shift_norm = True
    model.resblock_updown = False
    model.use_new_attention_order = False
    model.conv_resample = True
    model.dropout = 0.0
    model.num_classes = ml_collections.FieldReference(None, field_type=int)
    model.learn_sigma = learn_sigma  # linked: diffusion.learn_sigma
    model.label_dropout = label_dropout  # linked: training.label_dropout (> 0: a null row)
    # Compute dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU); params stay float32.
    model.dtype = "auto"
    model.remat = False  # rematerialise blocks to save memory
    # GroupNorm groups (32 in the paper's code, whose widths are >= 128: >= 4 channels a
    # group). At width 32 that is one channel a group, which removes every channel's
    # spatial mean: the network can no longer carry an image's colour (configs/quickstart.py).
    model.norm_groups = 32
    model.pool = "attention"  # classifier only: attention | adaptive | spatial | spatial_v2

    # --- Gaussian diffusion (the paper code's create_gaussian_diffusion arguments). --
    diffusion = config.diffusion = ml_collections.ConfigDict()
    diffusion.steps = 1000
    diffusion.learn_sigma = learn_sigma  # linked: model.learn_sigma
    diffusion.sigma_small = False
    diffusion.noise_schedule = "linear"
    diffusion.use_kl = False
    diffusion.predict_xstart = False
    diffusion.rescale_timesteps = False
    diffusion.rescale_learned_sigmas = False
    diffusion.timestep_respacing = ""  # "" = all steps; int, "250", "10,15,20", "ddim25"

    # --- Input pipeline. ---------------------------------------------------------------
    data = config.data = ml_collections.ConfigDict()
    data.dataset = "mnist_5k"  # tfds name, 'folder', or a built-in dataset
    data.data_dir = ml_collections.FieldReference(None, field_type=str)
    data.split = "train"
    data.image_size = image_size  # linked: model.image_size
    data.class_cond = False
    data.random_crop = False
    data.random_flip = True
    data.shuffle_buffer = 10_000
    data.prefetch = 2
    data.low_res_size = 0  # super-resolution: side of batch["low_res"]; 0 = none
    # 'standard' (paper loader), 'lsun' (paper's LSUN preparation first); 'auto' picks by name.
    data.preprocessing = "auto"
    data.eval_split = "validation"  # held-out split (classifier evaluation); mnist_5k: 'test'

    # --- Optimiser. --------------------------------------------------------------------
    optim = config.optim = ml_collections.ConfigDict()
    optim.lr = 1e-4
    optim.weight_decay = 0.0
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.warmup_steps = 0
    optim.anneal_lr = False  # the paper code's --anneal_lr: linear decay to 0 at num_steps
    optim.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)

    # --- Training loop. ----------------------------------------------------------------
    training = config.training = ml_collections.ConfigDict()
    training.num_steps = 500_000
    training.batch_size = 256  # global
    training.microbatch = -1  # -1 = no gradient accumulation
    training.ema_rates = (0.9999,)  # () = keep no EMA (the paper's classifiers)
    # EMA rate min(r, (1 + step) / (10 + step)): for short runs (not in the paper's code).
    training.ema_warmup = False
    training.log_every = 100
    training.checkpoint_every = 10_000
    training.keep_checkpoints = 3
    training.schedule_sampler = "uniform"  # 'uniform' | 'loss-second-moment'
    # With 'uniform': the share of examples trained at t = 0, the decoder term L_0 (not in
    # the paper's code; 0 = the paper's uniform t). Only bits/dim uses what it trains.
    training.decoder_share = 0.0
    # Classifier-free guidance (Ho & Salimans): each label is replaced by the null class
    # model.num_classes with this probability (linked: model.label_dropout).
    training.label_dropout = label_dropout
    # Fine-tuning: a convert_checkpoint directory or a training workdir whose parameters
    # start this run (fresh optimiser state); '' = random initialisation.
    training.init_from = ""
    training.init_from_ema_rate = ml_collections.FieldReference(None, field_type=float)
    # Deprecated: the old spelling of mesh.fsdp=-1 (and mesh.data=1); kept one release.
    training.fsdp = False
    # FSDP (mesh.fsdp > 1) shards arrays of at least this many elements; smaller stay
    # replicated.
    training.fsdp_min_size = 2**16
    # Non-finite loss/gradient: the update is skipped and counted; this many in a row
    # stops the run.
    training.max_nonfinite_steps = 20
    # EMA sample grid (config.sampling's sampler, fixed labels and x_T) as an image
    # summary + PNG; 0 = off. sample_steps: the grid's timestep_respacing (0 = sampling's).
    training.sample_every = 0
    training.sample_grid_size = 16
    training.sample_steps = 10
    # In-training evaluation: diffusion = FID of EMA samples against eval_reference (a
    # reference batch .npz) with the Inception weights at inception_weights (off when
    # eval_reference is ''); classifier = loss and accuracy on data.eval_split. 0 = off.
    training.eval_every = 0
    training.eval_num_samples = 1000
    training.eval_reference = ""
    training.inception_weights = ""
    training.noised = True  # classifier: train on q_sample(x, t) (the paper's --noised)
    # clu periodic_actions.Profile: trace this many steps once (0 = no profile).
    training.profile_steps = 0

    # --- Device mesh: ('data', 'fsdp'), device counts, -1 = the rest. ------------------
    # Batches split over both axes; parameters, EMA copies and optimiser state sharded
    # over 'fsdp' (1 = replicated: plain data parallelism). May change when resuming.
    mesh = config.mesh = ml_collections.ConfigDict()
    mesh.data = -1
    mesh.fsdp = 1
    # GiB of one device: a step that needs more is refused before data is read (0 = what
    # the backend reports; the CPU reports nothing). launch.plan sizes a run in advance.
    mesh.device_memory_gb = 0.0

    # --- Sampling (one FID-table row per config by default). ---------------------------
    sampling = config.sampling = ml_collections.ConfigDict()
    sampling.num_samples = 50_000
    sampling.batch_size = 256  # global
    sampling.method = "ancestral"  # 'ancestral' | 'ddim' | 'dpm_solver++'
    sampling.timestep_respacing = 250  # steps (dpm_solver++: its model evaluations)
    sampling.eta = 0.0
    sampling.clip_denoised = True
    sampling.classifier_scale = 0.0  # 0 = no classifier guidance
    sampling.classifier_config = ""  # e.g. 'configs/classifier256.py'
    sampling.classifier_checkpoint = ""
    sampling.use_ema = True  # training workdirs: sample with the first training.ema_rates copy
    # Class labels: 'random' (uniform), one class (7) or a tuple of classes used in turn.
    sampling.labels = ml_collections.FieldReference("random", field_type=object)
    # Classifier-free guidance scale s in eps_u + s (eps_c - eps_u) (1.0 = plain
    # conditional); needs a model trained with training.label_dropout > 0.
    sampling.cfg_scale = 1.0
    return config
