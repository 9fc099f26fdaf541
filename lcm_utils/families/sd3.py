"""Stable Diffusion 3 / 3.5: an MMDiT (`SD3Transformer2DModel`) on a flow-matching schedule.

Three text encoders, as `StableDiffusion3Pipeline.encode_prompt`: CLIP-L and CLIP-G (penultimate hidden states
concatenated, zero-padded to T5's width; pooled outputs concatenated) and T5, whose tokens follow CLIP's on the
sequence axis. Without T5 (a folder without `text_encoder_3/`, or --without_t5) its part is zeros, as the
pipeline makes it. The transformer has no guidance input, so a student never takes w (see docs/families.md for
the guidance to sample with). Every size is read from the configs.
"""

import functools
import os

import torch
import torch.nn.functional as F

from ..adversarial import Tap
from ..errors import ConfigError
from .sd import StableDiffusion, read_json

# Joint attention (image and text streams), SD3.5's second attention (attn2.*, matched by the bare names), and
# both streams' feed-forwards.
SD3_LORA_TARGETS = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,"
                    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2")
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default: sampling sees the same sequence


def _token_map(output, latent_shape, patch_size):
    """A joint block's image tokens [B, h*w, C] (its output is (text tokens, image tokens)) as [B, C, h, w]."""
    tokens = output[1]
    height, width = latent_shape[-2] // patch_size, latent_shape[-1] // patch_size
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class StableDiffusion3(StableDiffusion):
    """SD3 and SD3.5 (Medium with dual attention, Large): MMDiT, flow matching, CLIP-L + CLIP-G (+ T5)."""

    name = "SD3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_folder, denoiser_class_name = "transformer", "SD3Transformer2DModel"
    noise_scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    schedule_kind = "flow"
    reference_scheduler_class_name, reference_sampler_name = "FlowMatchEulerDiscreteScheduler", "Euler"
    lora_target_modules = SD3_LORA_TARGETS
    card_tags = ("stable-diffusion-3", "sd3")
    pipeline_loading_kwargs = {}
    text_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))

    def __init__(self, tokenizers, text_encoders, force_zeros_for_empty_prompt=None, joint_attention_dim=None):
        super().__init__(tokenizers, text_encoders, force_zeros_for_empty_prompt)
        self.joint_attention_dim = joint_attention_dim  # the zeros' width when T5 is absent

    @classmethod
    def matches(cls, denoiser_config):
        return denoiser_config.get("_class_name") == cls.denoiser_class_name

    @staticmethod
    def has_t5(local):
        return os.path.isfile(os.path.join(local, "text_encoder_3", "config.json"))

    @classmethod
    def check_folder(cls, local, denoiser_config, flag="--pretrained_teacher_model"):
        """The parts (T5 optional), then the transformer's text and pooled widths against the encoders' configs."""
        parts = [("vae", "config.json"), ("scheduler", "scheduler_config.json"), ("tokenizer", None),
                 ("text_encoder", "config.json"), ("tokenizer_2", None), ("text_encoder_2", "config.json")]
        if cls.has_t5(local):
            parts.append(("tokenizer_3", None))
        for sub, fname in parts:
            folder = os.path.join(local, sub)
            if not os.path.isdir(folder) or (fname and not os.path.isfile(os.path.join(folder, fname))):
                raise ConfigError(f"{flag}: '{local}' has an SD3 transformer but no {sub}/{fname or ''}; pass a "
                                  f"complete diffusers-format SD3 folder")
        clips = [read_json(local, sub, "config.json") for sub in ("text_encoder", "text_encoder_2")]
        joint = denoiser_config.get("joint_attention_dim")
        width = sum(c.get("hidden_size", 0) for c in clips)
        if joint is not None and joint < width:
            raise ConfigError(f"{flag}: transformer joint_attention_dim {joint} is below the two CLIP widths "
                              f"{clips[0].get('hidden_size')} + {clips[1].get('hidden_size')}")
        if cls.has_t5(local) and joint is not None and read_json(local, "text_encoder_3", "config.json").get(
                "d_model") != joint:
            raise ConfigError(f"{flag}: text_encoder_3 d_model differs from the transformer's joint_attention_dim "
                              f"{joint}")
        pooled = sum(c.get("projection_dim", 0) for c in clips)
        if denoiser_config.get("pooled_projection_dim") not in (None, pooled):
            raise ConfigError(f"{flag}: transformer pooled_projection_dim {denoiser_config['pooled_projection_dim']} "
                              f"!= the two CLIP projection dims {pooled}")
        scheduler = read_json(local, "scheduler", "scheduler_config.json")
        if scheduler.get("use_dynamic_shifting"):
            raise ConfigError(f"{flag}: '{local}/scheduler' sets use_dynamic_shifting (a resolution-dependent "
                              f"shift); SD3 teachers here need a fixed shift")

    @staticmethod
    def min_latent_side(denoiser_config):
        return denoiser_config.get("patch_size", 1)

    @staticmethod
    def latent_side_problem(denoiser_config, latent_side):
        patch, most = denoiser_config.get("patch_size", 1), denoiser_config.get("pos_embed_max_size")
        if latent_side % patch:
            return f"the transformer's patches are {patch} latent pixels; use a resolution that makes it a multiple"
        if most and latent_side > most * patch:
            return (f"the transformer's position embedding covers at most {most * patch} latent pixels a side; "
                    f"use a smaller resolution")
        return None

    @staticmethod
    def prediction_type(noise_scheduler_config):
        return "flow"

    @classmethod
    def build_student(cls, teacher_denoiser, time_cond_proj_dim):
        """Student = a copy of the teacher transformer: it has no guidance input, so w is distilled in."""
        config = dict(teacher_denoiser.config)
        config.pop("_use_default_values", None)
        student = cls.denoiser_class().from_config(config)
        student.load_state_dict(teacher_denoiser.state_dict())
        return student.to(dtype=torch.float32)

    @staticmethod
    def guidance_embedding_dim(student):
        return None

    @staticmethod
    def guidance_note(w_min, w_max):
        if 3.0 <= w_min + 1 and w_max + 1 <= 8.0:
            return None
        return (f"w in [{w_min:g}, {w_max:g}] distils guidance_scale {w_min + 1:g} to {w_max + 1:g} into the student; "
                f"SD3 samples at guidance_scale 4 to 7: set --w_min/--w_max (the SD3 presets use 3 to 6)")

    @staticmethod
    def denoise(model, z, t, cond, w_embedding=None):
        return model(hidden_states=z, timestep=t, **cond).sample

    @staticmethod
    def discriminator_taps(denoiser):
        """Every joint block's image tokens, laid back on the patch grid (1x1 heads on tokens, as PCM's SD3
        discriminator); the width is the transformer's heads x head size."""
        config = denoiser.config
        width = config.num_attention_heads * config.attention_head_dim
        read = functools.partial(_token_map, patch_size=config.patch_size)
        return [Tap(block, width, 1, read) for block in denoiser.transformer_blocks]

    # ------------------------------------------------------------------ text encoders and conditions

    @classmethod
    def text_folders(cls, path, without_t5=False):
        folders = [encoder for _, encoder in cls.text_parts]
        return folders[:2] if without_t5 or (os.path.isdir(path) and not cls.has_t5(path)) else folders

    @classmethod
    def load(cls, path, src, device, dtype, force_zeros_for_empty_prompt=None, without_t5=False):
        """CLIP-L, CLIP-G and (unless the folder lacks it or --without_t5) T5, frozen, in `dtype` on `device`."""
        from transformers import AutoTokenizer

        folders = cls.text_folders(path, without_t5)
        tokenizers, encoders = [], []
        for (tokenizer_folder, encoder_folder), encoder_cls in zip(cls.text_parts, cls.encoder_classes()):
            if encoder_folder not in folders:
                continue
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=tokenizer_folder, **src))
            if encoder_folder == "text_encoder_3":  # loaded in dtype: T5 keeps the modules that overflow fp16 in fp32
                encoder = encoder_cls.from_pretrained(path, subfolder=encoder_folder, torch_dtype=dtype, **src)
            else:
                encoder = encoder_cls.from_pretrained(path, subfolder=encoder_folder, **src).to(dtype=dtype)
            encoders.append(encoder.requires_grad_(False).eval().to(device))
        joint = cls.denoiser_class().load_config(path, subfolder=cls.denoiser_folder, **src)["joint_attention_dim"]
        return cls(tokenizers, encoders, force_zeros_for_empty_prompt, joint)

    @staticmethod
    def encoder_classes():
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)

    @torch.no_grad()
    def encode_text(self, captions):
        """Captions (B str) -> {"encoder_hidden_states": [B, 77 + 256, J], "pooled_projections": [B, P1 + P2]}."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            out = encoder(self._token_ids(tokenizer, captions), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        if len(self.text_encoders) == 3:
            ids = self.tokenizers[2](captions, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                     add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoders[2](ids.to(self.device))[0]
        else:  # the pipeline's stand-in for a missing T5, in the CLIP encoders' dtype
            t5 = torch.zeros(len(captions), T5_TOKENS, self.joint_attention_dim, device=self.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def _assemble(self, text, added):
        batch = max(v.shape[0] for v in text.values())
        return {k: v.expand(batch, *v.shape[1:]) for k, v in text.items()}

    # ------------------------------------------------------------------ the stock pipeline

    def pipeline(self, vae, denoiser, scheduler):
        t5 = len(self.text_encoders) == 3
        pipe = self.pipeline_class()(
            transformer=denoiser, scheduler=scheduler, vae=vae, text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0], text_encoder_2=self.text_encoders[1], tokenizer_2=self.tokenizers[1],
            text_encoder_3=self.text_encoders[2] if t5 else None, tokenizer_3=self.tokenizers[2] if t5 else None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def pipeline_loading_extras(cls, path, without_t5=False):
        if len(cls.text_folders(path, without_t5)) < 3:  # a folder saved without T5 reloads only this way
            return {"text_encoder_3": "None", "tokenizer_3": "None"}
        return {}

    @classmethod
    def save_lora(cls, folder, layers, adapter_metadata):
        cls.pipeline_class().save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True,
                                               transformer_lora_adapter_metadata=adapter_metadata)
