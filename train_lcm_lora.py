#!/usr/bin/env python
"""LCM-LoRA: latent consistency distillation into LoRA adapters on the teacher UNet (arXiv 2311.05556).

    accelerate launch train_lcm_lora.py --pretrained_teacher_model <folder or hub id> \
        --train_data_dir <images> --output_dir <out> [--config configs/sd15_lcm_lora.yaml]

Student: peft LoRA adapters on the teacher UNet; the teacher pass is the same UNet with the adapters
disabled, so the UNet weights are held once. No w-embedding, so the LoRA plugs into the base model and its
fine-tunes. Target: the online adapters under no_grad (as LCM-LoRA), or an EMA of the adapter weights
when --ema_decay > 0. Everything else is shared with train_lcm_distill.py in lcm_utils.
"""

import os

import torch

from lcm_utils.checkpoint import load_tensors, save_tensors
from lcm_utils.consistency import ema_update
from lcm_utils.engines import copy_full_into, full_tensors, uses_fsdp, zero_stage
from lcm_utils.errors import ConfigError
from lcm_utils.families import load_teacher_denoiser
from lcm_utils.training import (DistillationMethod, main, pretrained_parts, sampler_usage, stock_pipeline,
                                vae_import)


class LoraDistillation(DistillationMethod):
    name = "LCM-LoRA distillation"
    card_kind = "-LoRA"
    card_tags = ("lora", "lcm-lora")
    foreign_flags = ("--unet_time_cond_proj_dim",)
    foreign_script = "train_lcm_distill.py: a LoRA student has no w-embedding"

    @staticmethod
    def add_flags(parser):
        g = parser.add_argument_group("LCM-LoRA")
        g.add_argument("--lora_rank", type=int, default=64, help="LoRA rank r.")
        g.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha (scale = alpha / r).")
        g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA path.")
        g.add_argument("--lora_target_modules", type=str, default=None,
                       help="Comma-separated module names that get adapters (default: the teacher family's: for SD "
                            "and SDXL UNets, the attention projections, transformer in/out, feed-forward, ResNet "
                            "convs, resamplers and time-embedding projections).")
        g.add_argument("--ema_decay", type=float, default=0.0,
                       help="0: the target is the online adapters (LCM-LoRA). > 0: EMA of the adapter weights.")

    def check_args(self, args):
        if args.lora_rank <= 0 or args.lora_alpha <= 0:
            raise ConfigError(f"--lora_rank and --lora_alpha must be positive, got {args.lora_rank}, {args.lora_alpha}")
        if not 0.0 <= args.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
        if not 0.0 <= args.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in [0, 1) for LoRA (0 = no EMA), got {args.ema_decay}")
        if args.lora_target_modules is not None and not self.target_modules(args):
            raise ConfigError("--lora_target_modules is empty; give comma-separated module names")

    @staticmethod
    def target_modules(args):
        return [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]

    def teacher_load_dtype(self, args, weight_dtype):
        return weight_dtype if args.cast_teacher_unet else torch.float32  # the base is the teacher: cast in transit

    def build(self, teacher, args, weight_dtype):
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        if args.lora_target_modules is None:  # resolved here so that training_config.yaml records the family's
            args.lora_target_modules = self.family.lora_target_modules
        unet = self.student = teacher.denoiser
        if args.cast_teacher_unet:  # the frozen base is the teacher: its weights in the low precision
            unet.to(dtype=weight_dtype)
        try:
            unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                        target_modules=self.target_modules(args), init_lora_weights="gaussian"))
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ConfigError(f"--lora_target_modules: {str(e).splitlines()[0]}") from None
        self.lora_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        cast_training_params(unet, dtype=torch.float32)  # adapters train in fp32 whatever the base dtype
        unet.train()
        self.ema_decay = args.ema_decay
        self.ema = {n: p.detach().clone() for n, p in unet.named_parameters() if n in self.lora_names} \
            if self.ema_decay > 0 else None

    def denoisers(self):
        return [self.student]

    def lora_state(self):
        params = dict(self.student.named_parameters())
        return {name: params[name] for name in self.lora_names}

    def student_forward(self, z, t, cond, w):
        z, cond = self.inputs(self.student.dtype, z, cond)  # the base's dtype; peft casts to the adapters' itself
        return self.family.denoise(self.student_model, z, t, cond)

    def teacher_forward(self, z, t, cond):
        # On the unwrapped UNet (not through DDP): a no-grad pass that must not take part in gradient sync.
        z, cond = self.inputs(self.student.dtype, z, cond)
        self.student.disable_adapters()
        try:
            return self.family.denoise(self.student, z, t, cond)
        finally:
            self.student.enable_adapters()

    def target_forward(self, z, t, cond, w):
        z, cond = self.inputs(self.student.dtype, z, cond)
        if self.ema is None:
            return self.family.denoise(self.student, z, t, cond)
        # The EMA adapters stand in for the online ones for this call only; the online tensors stay
        # untouched, so the student's autograd graph is intact.
        return self.family.denoise(lambda *a, **k: torch.func.functional_call(self.student, self.ema, a, k), z, t,
                                   cond)

    def discriminator_backbone(self):
        return self.student  # the teacher pass is this UNet with its adapters off

    def update_target(self, gate=None):
        if self.ema is not None:
            online = self.lora_state()
            ema_update([self.ema[n] for n in self.lora_names], [online[n] for n in self.lora_names], self.ema_decay,
                       gate)

    def check_engine(self, args, acc):
        if zero_stage(acc) == 3:
            raise ConfigError("DeepSpeed ZeRO-3 is for full distillation (train_lcm_distill.py): LCM-LoRA trains a "
                              "few MB of adapters on a frozen base; use configs/accelerate_deepspeed_zero2.yaml, or "
                              "configs/accelerate_fsdp.yaml to shard the base")
        if uses_fsdp(acc) and args.ema_decay > 0:
            raise ConfigError("--ema_decay > 0 does not work under FSDP for LoRA: the EMA adapters cannot stand in "
                              "for sharded ones in a forward pass; use --ema_decay 0 (LCM-LoRA's own choice) or "
                              "DDP (configs/accelerate_multi_gpu.yaml)")

    def snapshot(self, student_only=False):
        weights = {"lora": full_tensors(self.lora_state())}
        if self.ema is not None and not student_only:
            weights["lora_ema"] = self.ema
        return weights

    def save_state(self, folder, weights):
        save_tensors(weights["lora"], os.path.join(folder, "lora.safetensors"))
        if "lora_ema" in weights:
            save_tensors(weights["lora_ema"], os.path.join(folder, "lora_ema.safetensors"))

    def load_state(self, folder):
        online = load_tensors(os.path.join(folder, "lora.safetensors"))
        if sorted(online) != sorted(self.lora_names):
            raise ConfigError(f"--resume_from_checkpoint: '{folder}' holds other adapters than this run's "
                              f"--lora_rank/--lora_target_modules; resume with the flags that wrote it")
        for name, param in self.lora_state().items():
            copy_full_into(param, online[name])
        if self.ema is not None:
            ema_file = os.path.join(folder, "lora_ema.safetensors")
            source = load_tensors(ema_file) if os.path.isfile(ema_file) else online
            for name in self.lora_names:
                self.ema[name].copy_(source[name])

    def save_lora(self, folder, tensors):
        """Write the adapters {name: full tensor} in diffusers' LoRA format (+ their LoraConfig), loadable by
        pipe.load_lora_weights."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.student, state_dict=tensors)
        self.family.save_lora(folder, state, self.student.peft_config["default"].to_dict())

    def export(self, output_dir, weights):
        self.save_lora(output_dir, weights["lora"])
        usage_ema, (scheduler, extra, steps) = "", sampler_usage(self.objective, self.family)
        if self.ema is not None:
            self.save_lora(os.path.join(output_dir, "ema"), weights["lora_ema"])
            usage_ema = " `ema/` holds the EMA of the adapters, loadable the same way."
        return (
            f"Use `{self.family.lora_weights_file}` (the online adapters).{usage_ema} On the base model or any fine-tune of it:\n\n"
            "```python\n"
            f"from diffusers import {vae_import(self.args)}{scheduler}, {self.family.pipeline_class_name}\n"
            f"pipe = {self.family.pipeline_class_name}.from_pretrained({pretrained_parts(self.args, self.family)})\n"
            f'pipe.scheduler = {scheduler}.from_pretrained("{output_dir}", subfolder="scheduler")\n'
            f'pipe.load_lora_weights("{output_dir}")\n'
            f"pipe.fuse_lora()  # optional: merge the adapters into the {self.family.denoiser_folder}\n"
            f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=1.0{extra}).images[0]\n'
            "```\n\nThe LoRA has no w-embedding: guidance_scale 1.0 (no CFG) is the usual choice; values in "
            "1-2 add real CFG at twice the cost per step."
        )

    def validation_pipeline(self, folder, teacher, args, device, weights):
        self.save_lora(folder, weights["lora"])
        base = load_teacher_denoiser(args, type(self.family))
        pipe = stock_pipeline(teacher, base.to(device, dtype=self.student.dtype).eval(), self.objective, args)
        pipe.load_lora_weights(folder)
        return pipe

    def default_validation_guidance(self, args):
        return 1.0  # LCM-LoRA samples without CFG

    def reference_guidance(self, args):
        """The teacher at the middle of the trained range: an LCM-LoRA samples without CFG but was distilled from
        the teacher with w ~ U[w_min, w_max]."""
        return (args.w_min + args.w_max) / 2 + 1

    validation_guidance_text = "1.0, no CFG, as LCM-LoRA samples"


if __name__ == "__main__":
    raise SystemExit(main(LoraDistillation, __doc__.splitlines()[0]))
