"""Setting a run up: the accelerator and seed, the teacher and the method's models, the optimizer and schedule."""

import math
import os

import torch

from .. import checkpoint as ckpt
from ..data import data_location
from ..engines import frozen_loading, uses_deepspeed, uses_fsdp, zero_stage
from ..errors import ConfigError
from ..families import load_teacher, teacher_identity
from ..safety import launch_path, stop_grace_warning
from ..tensors import precision_dtype


class Run:
    """What one training run is: its flags, method, accelerator, seed, id and low-precision dtype."""

    def __init__(self, args, method):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

        self.args, self.method = args, method
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                logging_dir=os.path.join(args.output_dir, args.logging_dir)))
        if args.seed is None:  # draw one on the main process and record it, so the run can be repeated
            args.seed = broadcast_object_list([int.from_bytes(os.urandom(4), "little") >> 1])[0]
        # Names this run across its checkpoints and resumes (a resume takes the checkpoint's), for the export record.
        self.run_id = broadcast_object_list([os.urandom(8).hex()])[0]
        self.teacher_identity = teacher_identity(args)  # recorded in every checkpoint: a resume compares it
        self.launcher, self.stop_grace_s = launch_path()  # how long a stop's checkpoint may take
        self.grace_warned = False
        set_seed(args.seed)  # same on every rank: identical initialisation everywhere
        self.weight_dtype = precision_dtype(acc.mixed_precision)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if acc.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            ckpt.remove_stale_partials(args.output_dir)
        self.repo_id = None
        if args.push_to_hub:  # the main process creates the repo; every rank stops if that failed
            outcome = create_hub_repo(args) if acc.is_main_process else None
            outcome = broadcast_object_list([outcome])[0]
            if isinstance(outcome, ConfigError):
                raise outcome
            self.repo_id = outcome
        self.references = None  # the teacher's own validation samples, made at the first validation

    def log(self, *messages):
        if self.accelerator.is_main_process:
            print(*messages, flush=True)


def create_hub_repo(args):
    """The repo id, or a ConfigError saying why it could not be created (offline, no token, no rights)."""
    try:
        from huggingface_hub import create_repo

        return create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                           exist_ok=True, token=args.hub_token, private=True).repo_id
    except Exception as e:  # say so before training, not after
        return ConfigError(f"--push_to_hub: cannot create the Hub repo ({type(e).__name__}: {str(e)[:200]}); "
                           f"log in with `hf auth login` or drop --push_to_hub")


def build_models(run, stream):
    """Load the teacher (its VAE and text encoders on the CPU when the stream is precomputed: they only serve
    validation) and build the method's student and target, with the run's attention, layout and compilation."""
    args, method, device = run.args, run.method, run.accelerator.device
    with frozen_loading(run.accelerator):
        teacher = load_teacher(args, device, run.weight_dtype, torch.device("cpu") if stream.precomputed else device,
                               method.teacher_load_dtype(args, run.weight_dtype))
    if stream.precomputed:
        teacher.family.set_unconditional_text(stream.unconditional_text, device)
    method.setup(teacher, args, run.weight_dtype)
    if args.enable_xformers_memory_efficient_attention:
        for denoiser in method.denoisers():
            denoiser.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        method.student.enable_gradient_checkpointing()
    for denoiser in method.denoisers():
        if args.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        if args.torch_compile:  # in place: the modules keep their type, state dict names and save_pretrained
            denoiser.compile()
    return teacher


def build_adversary(run, teacher):
    """The adversarial term's discriminator on the method's frozen teacher pass, or None (--adv_weight 0)."""
    args, acc, method = run.args, run.accelerator, run.method
    if not args.adv_weight > 0:
        return None
    from ..adversarial import Adversary

    taps = teacher.family.discriminator_taps(method.discriminator_backbone())
    return Adversary(method.teacher_forward, taps, args.adv_weight, args.adv_real, args.adv_lr, args.adam_weight_decay,
                     acc.device, args.seed, acc.num_processes, args.adam_epsilon, args.adv_timesteps,
                     args.adv_fake)


def make_optimizer(params, lr, args):
    """AdamW: bitsandbytes' 8-bit one with --use_8bit_adam; else torch's fused kernel where the parameters' device
    has one (CUDA, CPU, XPU, MPS: one kernel for all tensors, and a skipped update decided on the device), else
    the foreach one."""
    settings = dict(lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                    eps=args.adam_epsilon)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **settings)
    try:
        return torch.optim.AdamW(params, fused=True, **settings)
    except RuntimeError:  # "fused=True requires all the params to be floating point Tensors of supported devices"
        return torch.optim.AdamW(params, foreach=True, **settings)


def learning_rate(args, num_processes):
    """--learning_rate, times the global batch with --scale_lr."""
    if args.scale_lr:
        return args.learning_rate * (args.gradient_accumulation_steps * args.train_batch_size * num_processes)
    return args.learning_rate


def resolve_max_train_steps(args, stream, num_processes):
    if args.max_train_steps is not None:
        return args.max_train_steps
    per_step = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    return args.num_train_epochs * math.ceil(stream.samples_per_epoch / per_step)


def skips_on_device(acc, optimizer):
    """Whether the optimizer can skip an update on the device (a fused torch Adam/AdamW reads `found_inf`);
    DeepSpeed steps its own engine."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return (isinstance(inner, torch.optim.Adam) and bool(inner.defaults.get("fused")) and not uses_deepspeed(acc))


def summary(args, teacher, acc, precomputed=False):
    """The run in a few lines; the full configuration is in training_config.yaml (and printed with --verbose)."""
    data = data_location(args)
    if precomputed:
        data += " (precomputed latents and text embeddings)"
    precision = acc.mixed_precision if acc.mixed_precision != "no" else "fp32"
    engine = " (FSDP)" if uses_fsdp(acc) else f" (DeepSpeed ZeRO-{zero_stage(acc)})" if uses_deepspeed(acc) else ""
    vae = args.pretrained_vae_model_name_or_path or "the teacher's vae/"
    vae_param = next(teacher.vae.parameters())
    vae_use = "validation only" if precomputed else "encodes every batch"
    note = teacher.family.guidance_note(args.w_min, args.w_max)  # a guidance range the family does not sample at
    warning = f"\nwarning:   {note}" if note else ""
    return (f"teacher:   {args.pretrained_teacher_model} ({teacher.family.name}, {teacher.prediction_type})\n"
            f"vae:       {vae} ({str(vae_param.dtype).replace('torch.', '')} on {vae_param.device.type}, "
            f"{vae_use})\n"
            f"data:      {data}\n"
            f"batch:     {args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x "
            f"{acc.num_processes} process(es){engine}, {args.resolution} px, {precision} on {acc.device.type}\n"
            f"output:    {args.output_dir} (every flag in training_config.yaml){warning}")


def tracker_config(args):
    """Tracker hyperparameters must be scalars: lists become strings, the token is left out."""
    return {k: (str(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()
            if k != "hub_token" and (v is None or isinstance(v, (int, float, str, bool, list, tuple)))}


def warn_if_a_stop_cannot_save(run, save_s=None):
    """Say once when a checkpoint (estimated at start, then timed at each save) takes longer than the launcher lets a
    stop run before its kill."""
    if run.grace_warned:
        return
    warning = stop_grace_warning(run.launcher, run.stop_grace_s, run.method.checkpoint_bytes(), save_s)
    if warning:
        run.grace_warned = True
        run.log(warning)
