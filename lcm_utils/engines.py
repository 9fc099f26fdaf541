"""What the engines beyond DDP change. FSDP: the student's weights are shards (DTensors), so everything that
reads or writes whole weights goes through here; without FSDP each function is the plain module or tensor
operation. DeepSpeed: the run's flags into its config.

Checkpoints always hold full (gathered) weights: a run resumes on any number of processes, with or without
FSDP for the weights (the optimizer state has one layout per engine, see `save_optimizer_state`).
"""

import contextlib
import json
import os

import torch

from .checkpoint import load_tensors, load_torch, save_tensors, save_torch
from .consistency import ema_update
from .errors import ConfigError

MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"  # torch's own state_dict(): parameters by index
OPTIMIZER_FSDP_FILE = "optimizer_fsdp.pt"  # torch.distributed.checkpoint's full state: parameters by name


def uses_fsdp(acc):
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def uses_deepspeed(acc):
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


@contextlib.contextmanager
def frozen_loading(acc):
    """A context for loading the models that stay out of the engine (teacher, text encoders, VAE). Under ZeRO-3
    transformers' from_pretrained partitions a model as it loads (zero.Init) whenever a ZeRO-3 config is
    registered, whatever the config's zero3_init_flag, and it would be empty here: unregister it meanwhile."""
    plugin = acc.state.deepspeed_plugin if uses_deepspeed(acc) else None
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def engine_name(acc):
    """The engine a checkpoint's optimizer state belongs to (recorded in it; a resume needs the same)."""
    if uses_fsdp(acc):
        return "FSDP"
    return f"DeepSpeed ZeRO-{zero_stage(acc)}" if uses_deepspeed(acc) else "DDP"


def checkpoint_engine(state, folder):
    """The engine that wrote a checkpoint: recorded in its state, or (older checkpoints) read from its files."""
    if "engine" in state:
        return state["engine"]
    if os.path.isdir(os.path.join(folder, "deepspeed")):
        return "DeepSpeed"
    return "FSDP" if os.path.isfile(os.path.join(folder, OPTIMIZER_FSDP_FILE)) else "DDP"


def check_engine_support(acc):
    """What accelerate can be configured to do and this trainer does not, before any model loads."""
    if uses_fsdp(acc) and not acc.is_fsdp2:
        raise ConfigError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config (as "
                          "configs/accelerate_fsdp.yaml does; needs torch >= 2.6)")
    if uses_fsdp(acc) and acc.state.fsdp_plugin.activation_checkpointing:
        raise ConfigError("fsdp_activation_checkpointing is not supported (it renames the student's modules); set "
                          "it to false in the accelerate config and pass --gradient_checkpointing instead")


def fit_fsdp_wrap(acc, model):
    """The layer classes FSDP wraps, fitted to `model`: accelerate refuses a configured class the model lacks, so one
    config could not serve a UNet and an MMDiT. The configured classes this model has are kept; with none, the
    model's own _no_split_modules (diffusers lists its blocks there). Returns the classes wrapped."""
    plugin = acc.state.fsdp_plugin if uses_fsdp(acc) else None
    if plugin is None or not plugin.transformer_cls_names_to_wrap:
        return []
    names = plugin.transformer_cls_names_to_wrap
    names = names.split(",") if isinstance(names, str) else list(names)
    present = {type(module).__name__ for module in model.modules()}
    kept = [name for name in names if name in present]
    plugin.transformer_cls_names_to_wrap = kept or None
    return kept or [name for name in getattr(model, "_no_split_modules", None) or [] if name in present]


def configure_deepspeed(acc, args):
    """The run's micro batch, accumulation and clipping flags into the DeepSpeed config, before the engine is
    built: accelerate reads the micro batch from a DataLoader it prepares (the stream is not one), and where the
    config's accumulation differs from the flag it keeps the config's."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * acc.num_processes
    config["gradient_clipping"] = max(args.max_grad_norm, 0.0)


def zero_stage(acc):
    """The DeepSpeed ZeRO stage of the run, 0 without DeepSpeed."""
    return int(acc.state.deepspeed_plugin.zero_stage or 0) if uses_deepspeed(acc) else 0


def is_partitioned(param):
    """A ZeRO-3 parameter: its data is an empty placeholder outside a gather."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params, modifier_rank=None):
    """Inside, every ZeRO-3 parameter in `params` holds its full value (a collective: all ranks enter); with
    modifier_rank, that rank's changes are kept and broadcast on exit. Nothing to do for other parameters."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def _module_params(module):
    """(prefix, {name: parameter}) per submodule that owns parameters: ZeRO-3 gathers one at a time."""
    for prefix, sub in module.named_modules():
        params = dict(sub.named_parameters(recurse=False))
        if params:
            yield (prefix + "." if prefix else ""), params


def _master(param):
    """DeepSpeed's fp32 master of a trainable parameter (a collective call), or None where it keeps none. Under
    DeepSpeed in fp16/bf16 the module holds a low-precision copy; the fp32 weights live in its optimizer."""
    if param.requires_grad and (hasattr(param, "_hp_mapping") or is_partitioned(param)):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return None


def _is_main():
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def is_sharded(tensor):
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def module_is_sharded(module):
    return any(is_sharded(p) for p in module.parameters())


def local_shards(params):
    """Each parameter's own shard on this rank (a plain tensor is its own shard): pointwise updates such as the
    EMA run on them without communication when the two sides are sharded alike."""
    return [p.to_local() if is_sharded(p) else p for p in params]


def shard_like(module, reference):
    """fully_shard `module` as FSDP2 sharded `reference` (same submodule units, same mesh): every parameter of the
    one is then split exactly like the same-named parameter of the other. For the EMA target of a sharded
    student; it is frozen and never handed to an optimizer."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = next(p.device_mesh for p in reference.parameters() if is_sharded(p))
    units = dict(module.named_modules())
    # Children before parents, as FSDP2 requires; the root last.
    names = [name for name, sub in reference.named_modules() if isinstance(sub, FSDPModule) and name]
    for name in sorted(names, key=lambda n: -n.count(".")):
        fully_shard(units[name], mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


def full_state_dict(module):
    """The module's weights as full CPU tensors. Sharded (FSDP) or in a DeepSpeed engine (the fp32 masters, ZeRO-3
    partitions gathered): a collective call on every rank; the main process gets the tensors, the others an
    empty dict. Else the module's own state_dict (no copy)."""
    if any(is_partitioned(p) or hasattr(p, "_hp_mapping") for p in module.parameters()):
        state, main = {}, _is_main()
        for prefix, params in _module_params(module):
            with gathered(params.values()):
                for name, p in params.items():
                    master = _master(p)
                    if main:
                        state[prefix + name] = (p if master is None else master).detach().cpu().clone()
        if main:
            keys = module.state_dict().keys()
            state.update({name: b.detach().cpu().clone() for name, b in module.named_buffers() if name in keys})
        return state
    if not module_is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module, state):
    """Inverse of full_state_dict: every rank passes the same full tensors; a sharded or partitioned module keeps
    its layout."""
    if any(is_partitioned(p) for p in module.parameters()):
        main = _is_main()
        with torch.no_grad():
            for prefix, params in _module_params(module):
                with gathered(params.values(), modifier_rank=0):
                    if main:
                        for name, p in params.items():
                            p.copy_(state[prefix + name])
        module.load_state_dict({name: state[name] for name, _ in module.named_buffers() if name in state},
                               strict=False)
        return
    if not module_is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def ema_update_modules(target, online, decay, gate=None):
    """target <- EMA of online (two modules of the same structure; see consistency.ema_update). FSDP: the two are
    sharded alike and each rank updates its own shards. ZeRO-3: the online weights are gathered one submodule
    at a time into the whole target that every rank holds."""
    if not any(is_partitioned(p) for p in online.parameters()):
        ema_update(local_shards(target.parameters()), local_shards(online.parameters()), decay, gate)
        return
    targets = dict(target.named_parameters())
    for prefix, params in _module_params(online):
        with gathered(params.values()):
            ema_update([targets[prefix + name] for name in params], params.values(), decay, gate)


def full_tensors(tensors):
    """{name: tensor} with every DTensor gathered to a full tensor and every DeepSpeed parameter replaced by its
    fp32 master (collective: call it on every rank)."""
    full = {}
    for name, t in tensors.items():
        master = _master(t)
        full[name] = t.full_tensor() if is_sharded(t) else t if master is None else master
    return full


@torch.no_grad()
def copy_full_into(param, full):
    """param <- full, where param may be a shard of the tensor `full` describes."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(full)


def write_model_folder(module, folder, state):
    """A diffusers model folder (config.json + one safetensors file) from the full `state` of `module`; what
    save_pretrained writes, except that a model above 10 GB (SDXL in fp32) stays one file."""
    os.makedirs(folder, exist_ok=True)
    module.save_config(folder)
    save_tensors(state, os.path.join(folder, MODEL_WEIGHTS))


def read_model_weights(folder):
    """The full weights in a model folder, whether one safetensors file or save_pretrained's shards + index."""
    index = os.path.join(folder, MODEL_WEIGHTS + ".index.json")
    if not os.path.isfile(index):
        return load_tensors(os.path.join(folder, MODEL_WEIGHTS))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_tensors(os.path.join(folder, name)))
    return state


def save_optimizer_state(acc, model, optimizer, folder):
    """The optimizer state into the checkpoint folder. DeepSpeed: every rank writes its own partition through
    accelerate (DeepSpeed's files). FSDP: the shards gathered by parameter name (collective; the main process
    writes), so the state loads on any number of processes. Else torch's state_dict, from the main process."""
    if uses_deepspeed(acc):
        acc.save_state(os.path.join(folder, "deepspeed"))
    elif uses_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(model, _inner(optimizer),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if acc.is_main_process:
            save_torch(os.path.join(folder, OPTIMIZER_FSDP_FILE), state)
    elif acc.is_main_process:
        save_torch(os.path.join(folder, OPTIMIZER_FILE), optimizer.state_dict())


def load_optimizer_state(acc, model, optimizer, folder):
    """Inverse of save_optimizer_state; resume has checked that the same engine wrote the checkpoint."""
    if uses_deepspeed(acc):
        acc.load_state(os.path.join(folder, "deepspeed"))
    elif uses_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, _inner(optimizer), load_torch(os.path.join(folder, OPTIMIZER_FSDP_FILE)),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(load_torch(os.path.join(folder, OPTIMIZER_FILE)))


def _inner(optimizer):
    """torch's optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
