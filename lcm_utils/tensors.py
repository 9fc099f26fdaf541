"""Tiny tensor helpers every layer shares: the precision names, host-to-device moves, input dtypes."""

import torch

# The names --mixed_precision and --storage_dtype take; "no" (and anything else) means fp32.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def precision_dtype(name):
    """torch dtype of a precision name ("fp16", "bf16"; "no" or None: float32)."""
    return DTYPES.get(name, torch.float32)


def to_device(tensor, device):
    """A host tensor on `device` without waiting for the work queued there: pinned, then copied non-blocking (a
    plain copy from pageable memory makes the host wait for the device's stream)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_latent_space(z, scaling_factor, shift_factor=None):
    """A VAE's raw latents -> the denoiser's: (z - shift) * scale. SD and SDXL VAEs have no shift (None); SD3's
    has one (its config's shift_factor)."""
    return (z - (shift_factor or 0.0)) * scaling_factor


def from_latent_space(z, scaling_factor, shift_factor=None):
    """Inverse of to_latent_space: the denoiser's latents -> what the VAE decodes."""
    return z / scaling_factor + (shift_factor or 0.0)


def in_dtype(dtype, z, cond, fp32_keys=()):
    """(z, cond) with every floating tensor in `dtype`, the dtype of the denoiser they go into, except the condition
    keys the family keeps in fp32 (`fp32_keys`). Under autocast this changes no value; under DeepSpeed, where
    accelerate does not autocast, a half-precision engine must get half-precision inputs, and an fp32 teacher
    fp32 ones (the text encoders run in the low precision)."""
    if isinstance(cond, dict):
        return z.to(dtype), {key: value if key in fp32_keys else in_dtype(dtype, z, value, fp32_keys)[1]
                             for key, value in cond.items()}
    return z.to(dtype), (cond.to(dtype) if cond.is_floating_point() else cond)
