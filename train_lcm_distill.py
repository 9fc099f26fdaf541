#!/usr/bin/env python
"""Latent consistency distillation of a Stable Diffusion teacher into a full student UNet.

    accelerate launch train_lcm_distill.py --pretrained_teacher_model <folder or hub id> \
        --train_data_dir <images> --output_dir <out> [--config configs/sd15_lcm.yaml]

Student: a copy of the teacher UNet that also takes the guidance w (a sinusoidal w-embedding through
`time_embedding.cond_proj`, zero-initialised so the initial student equals the teacher). Target: an EMA
copy of the student (LCM paper, Algorithm 1). Everything else is shared with train_lcm_lora.py in lcm_utils.
"""

import copy
import os

from lcm_utils.consistency import guidance_embedding
from lcm_utils.engines import (ema_update_modules, full_state_dict, load_full_state_dict, read_model_weights,
                               shard_like, write_model_folder)
from lcm_utils.errors import ConfigError
from lcm_utils.training import (DistillationMethod, main, pretrained_parts, sampler_usage, stock_pipeline,
                                vae_import)


class FullDistillation(DistillationMethod):
    name = "full LCM distillation"
    card_kind = "-distilled"
    foreign_flags = ("--lora_rank", "--lora_alpha", "--lora_dropout", "--lora_target_modules")
    foreign_script = "train_lcm_lora.py for LCM-LoRA"

    @staticmethod
    def add_flags(parser):
        g = parser.add_argument_group("full distillation")
        g.add_argument("--unet_time_cond_proj_dim", type=int, default=256,
                       help="Size of the student's w-embedding (used when the teacher has none).")
        g.add_argument("--ema_decay", type=float, default=0.95, help="EMA rate mu of the target UNet.")

    def check_args(self, args):
        if args.unet_time_cond_proj_dim < 4:
            raise ConfigError(f"--unet_time_cond_proj_dim must be >= 4, got {args.unet_time_cond_proj_dim}")
        if not 0.0 <= args.ema_decay <= 1.0:
            raise ConfigError(f"--ema_decay must be in [0, 1], got {args.ema_decay}")

    def build(self, teacher, args, weight_dtype):
        self.teacher_denoiser = teacher.denoiser
        self.student = self.family.build_student(teacher.denoiser, args.unet_time_cond_proj_dim)
        self.student = self.student.to(teacher.denoiser.device).train()
        if args.cast_teacher_unet:  # only after the student copied the fp32 weights
            teacher.denoiser.to(dtype=weight_dtype)
        # The target keeps fp32 weights: an EMA with mu = 0.95 adds updates a bf16 weight would round away.
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.guidance_embedding_dim = self.family.guidance_embedding_dim(self.student)
        self.ema_decay = args.ema_decay

    def denoisers(self):
        return [self.student, self.target, self.teacher_denoiser]

    def _w_embedding(self, w, dtype):
        if self.guidance_embedding_dim is None:  # a denoiser with no guidance input (SD3): w is distilled in
            return None
        return guidance_embedding(w, self.guidance_embedding_dim).to(dtype)

    def student_forward(self, z, t, cond, w):
        z, cond = self.inputs(self.student.dtype, z, cond)
        return self.family.denoise(self.student_model, z, t, cond, self._w_embedding(w, z.dtype))

    def teacher_forward(self, z, t, cond):
        z, cond = self.inputs(self.teacher_denoiser.dtype, z, cond)
        return self.family.denoise(self.teacher_denoiser, z, t, cond)

    def target_forward(self, z, t, cond, w):
        z, cond = self.inputs(self.target.dtype, z, cond)
        return self.family.denoise(self.target, z, t, cond, self._w_embedding(w, z.dtype))

    def discriminator_backbone(self):
        return self.teacher_denoiser

    def update_target(self, gate=None):
        ema_update_modules(self.target, self.student, self.ema_decay, gate)

    def shard(self):
        shard_like(self.target, self.student)

    def _parts(self, student_only=False):
        """{folder name: module}: the student in the family's denoiser folder, the target beside it."""
        folder = self.family.denoiser_folder
        return {folder: self.student} if student_only else {folder: self.student, f"{folder}_target": self.target}

    def snapshot(self, student_only=False):
        return {name: full_state_dict(module) for name, module in self._parts(student_only).items()}

    def save_state(self, folder, weights):
        for name, state in weights.items():
            write_model_folder(self.student, os.path.join(folder, name), state)

    def load_state(self, folder):
        for name, module in self._parts().items():
            load_full_state_dict(module, read_model_weights(os.path.join(folder, name)))

    def export(self, output_dir, weights):
        self.save_state(output_dir, weights)
        pipeline, guidance = self.family.pipeline_class_name, self.default_validation_guidance(self.args)
        model, folder = self.family.denoiser_class_name, self.family.denoiser_folder
        scheduler, extra, steps = sampler_usage(self.objective, self.family)
        also = ("\n\n`LatentConsistencyModelPipeline` loads it the same way." if pipeline == "StableDiffusionPipeline"
                and scheduler == "LCMScheduler" else "")
        return (
            f"Use `{folder}/` (the online student; `{folder}_target/` is its EMA, often a little smoother):\n\n"
            "```python\n"
            f"from diffusers import {vae_import(self.args)}{scheduler}, {pipeline}, {model}\n"
            f'{folder} = {model}.from_pretrained("{output_dir}", subfolder="{folder}")\n'
            f'scheduler = {scheduler}.from_pretrained("{output_dir}", subfolder="scheduler")\n'
            f"pipe = {pipeline}.from_pretrained({pretrained_parts(self.args, self.family)}, {folder}={folder}, "
            f"scheduler=scheduler)\n"
            f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={guidance:g}{extra})'
            '.images[0]\n'
            f"```{also}\n\n{self._guidance_note()}"
        )

    def _guidance_note(self):
        if self.guidance_embedding_dim is None:
            return (f"The student has no guidance input: the teacher's CFG at w in [{self.args.w_min:g}, "
                    f"{self.args.w_max:g}] (guidance_scale w + 1) is distilled into it. Sample with guidance_scale "
                    f"1.0 (no CFG pass); values above 1 add real CFG on top, at twice the cost per step.")
        return (f"The student takes the guidance w as an input (no CFG pass at sampling); diffusers' pipelines feed "
                f"it as `guidance_scale = w + 1`, so guidance_scale {self.args.w_min + 1:g} to "
                f"{self.args.w_max + 1:g} is the trained range.")

    def validation_pipeline(self, folder, teacher, args, device, weights):
        write_model_folder(self.student, folder, weights[self.family.denoiser_folder])
        student = self.family.denoiser_class().from_pretrained(folder).to(device).eval()
        return stock_pipeline(teacher, student, self.objective, args)

    def default_validation_guidance(self, args):
        if self.guidance_embedding_dim is None:
            return 1.0  # no w input: the guidance is distilled in, a CFG pass would add more
        return args.w_min + 1  # the pipeline embeds guidance_scale - 1 = w_min, a value seen in training

    def reference_guidance(self, args):
        """The teacher at the grid's guidance: the student embeds w = guidance - 1, the teacher's CFG uses that w
        (a student without a w input at the middle of the trained range)."""
        if self.guidance_embedding_dim is None:
            return (args.w_min + args.w_max) / 2 + 1
        g = args.validation_guidance_scale
        return self.default_validation_guidance(args) if g is None else g

    validation_guidance_text = ("w_min + 1, so the student's w-embedding gets w_min; 1.0 for a student without one "
                                "(SD3)")


if __name__ == "__main__":
    raise SystemExit(main(FullDistillation, __doc__.splitlines()[0]))
