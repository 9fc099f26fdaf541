"""SDXL and its relatives (SSD-1B, Vega, fine-tunes): a UNet with `addition_embed_type: text_time`.

Two CLIP encoders (penultimate hidden states concatenated), the second's pooled output, and micro-conditioning
time ids, exactly as `StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids`. Every dimension comes from
the loaded configs.
"""

import torch

from ..errors import ConfigError
from ..tensors import to_device
from .sd import StableDiffusion, read_json


class StableDiffusionXL(StableDiffusion):
    """SDXL: two text encoders, pooled text embeddings and time ids as added conditions."""

    name = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    card_tags = ("stable-diffusion-xl",)
    pipeline_loading_kwargs = {}
    uses_original_size = True
    text_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    # The UNet projects the time ids in float32: in bf16, 1366 px would read as 1368.
    fp32_conditions = ("time_ids",)
    default_force_zeros = True  # StableDiffusionXLPipeline's default when model_index.json does not say

    @classmethod
    def missing_part_context(cls, denoiser_config):
        return f"an {cls.name} UNet (addition_embed_type {denoiser_config.get('addition_embed_type')!r}) but "

    @classmethod
    def check_folder(cls, local, denoiser_config, flag="--pretrained_teacher_model"):
        """The parts, then the UNet's text width and added-embedding size against the two text encoders (read from
        the configs, so SSD-1B, Vega and fine-tunes pass without any hard-coded size)."""
        super().check_folder(local, denoiser_config, flag)
        te1, te2 = read_json(local, "text_encoder", "config.json"), read_json(local, "text_encoder_2", "config.json")
        text_width = te1.get("hidden_size", 0) + te2.get("hidden_size", 0)
        if denoiser_config.get("cross_attention_dim") not in (None, text_width):
            raise ConfigError(f"{flag}: unet cross_attention_dim {denoiser_config['cross_attention_dim']} "
                              f"!= the two text encoders' widths {te1.get('hidden_size')} + {te2.get('hidden_size')}")
        expected = (denoiser_config.get("addition_time_embed_dim") or 0) * 6 + te2.get("projection_dim", 0)
        got = denoiser_config.get("projection_class_embeddings_input_dim")
        if got != expected:
            raise ConfigError(f"{flag}: unet projection_class_embeddings_input_dim is {got}, but 6 time ids x "
                              f"addition_time_embed_dim + text_encoder_2 projection_dim = {expected}")

    @staticmethod
    def encoder_classes():
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return (CLIPTextModel, CLIPTextModelWithProjection)

    @torch.no_grad()
    def encode_text(self, captions):
        """Captions (B str) -> {"encoder_hidden_states": [B, 77, D1 + D2], "text_embeds": [B, P]}."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self._token_ids(tokenizer, captions), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output (of the second encoder)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def added_conditions(self, batch, resolution, fixed_crop_and_size):
        return {"time_ids": to_device(time_ids(batch["original_sizes"], batch["crop_top_lefts"], resolution,
                                               fixed_crop_and_size), self.unconditional_text()["text_embeds"].device)}

    def _assemble(self, text, added):
        # Broadcast a [1, ...] unconditional text to the batch; the time ids are the batch's (the pipeline's
        # negative time ids equal the positive ones unless a user passes negative sizes).
        batch = added["time_ids"].shape[0]
        return {"encoder_hidden_states": text["encoder_hidden_states"].expand(batch, -1, -1),
                "added_cond_kwargs": {"text_embeds": text["text_embeds"].expand(batch, -1),
                                      "time_ids": added["time_ids"]}}

    def pipeline(self, vae, denoiser, scheduler):
        pipe = self.pipeline_class()(vae=vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                                     tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=denoiser,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=self.force_zeros,
                                     add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def time_ids(original_sizes, crop_top_lefts, resolution, fixed_crop_and_size=False):
    """SDXL micro-conditioning (SDXL paper, arXiv 2307.01952, sec. 2.2): [B, 6] float32 rows
    (original height, original width, crop top, crop left, target height, target width).

    original_sizes, crop_top_lefts: [B, 2] as the data stream gives them, (height, width) and (top, left).
    fixed_crop_and_size: --use_fix_crop_and_size, original = target = (resolution, resolution), crop (0, 0)."""
    original = torch.as_tensor(original_sizes, dtype=torch.float32)
    crop = torch.as_tensor(crop_top_lefts, dtype=torch.float32)
    if fixed_crop_and_size:
        original, crop = torch.full_like(original, float(resolution)), torch.zeros_like(crop)
    target = torch.full_like(original, float(resolution))
    return torch.cat([original, crop, target], dim=1)
