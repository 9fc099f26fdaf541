"""Stable Diffusion 1.x/2.x: a UNet with no added embeddings, one CLIP text encoder, a DDPM noise schedule.

This class is also the base of every family: what a family owns is listed here, and a new family overrides what
differs (see docs/architecture.md). The loop and the objectives only see the condition dicts it returns and the
schedule it loads, so they never ask which family they train.
"""

import inspect
import json
import os

import torch

from ..adversarial import Tap
from ..errors import ConfigError
from ..tensors import to_device

# Attention projections, transformer in/out, feed-forward, ResNet convs, resamplers, time-embedding projections.
UNET_LORA_TARGETS = ("to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,"
                     "conv_shortcut,downsamplers.0.conv,upsamplers.0.conv,time_emb_proj")


def _first(output, latent_shape):
    return output[0]  # a down block returns (hidden states, the skips it hands to the up blocks)


def _itself(output, latent_shape):
    return output


def read_json(folder, *parts):
    with open(os.path.join(folder, *parts)) as f:
        return json.load(f)


class StableDiffusion:
    """SD 1.x/2.x: one CLIP text encoder, its last hidden state; the unconditional branch encodes ""."""

    name = "SD 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_folder, denoiser_class_name = "unet", "UNet2DConditionModel"
    noise_scheduler_class_name = "DDPMScheduler"  # holds the schedule the solver reads (alphas_cumprod)
    schedule_kind = "diffusion"  # objectives.SCHEDULES: the solver's schedule and the samplers exported
    reference_scheduler_class_name = "DDIMScheduler"  # the teacher's own sampler that validation compares with
    reference_sampler_name = "DDIM"  # that sampler in words
    lora_target_modules = UNET_LORA_TARGETS  # --lora_target_modules when the flag is not given
    lora_weights_file = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights reads
    card_tags = ("stable-diffusion",)
    pipeline_loading_kwargs = {"safety_checker": None, "requires_safety_checker": False}  # from_pretrained's extras
    uses_original_size = False  # no micro-conditioning: the samples' original sizes are not read
    text_parts = (("tokenizer", "text_encoder"),)  # (tokenizer folder, text encoder folder) per encoder
    fp32_conditions = ()  # condition keys that stay fp32 whatever the denoiser's dtype
    default_force_zeros = False  # the SD pipelines always encode the empty negative prompt

    def __init__(self, tokenizers, text_encoders, force_zeros_for_empty_prompt=None):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.force_zeros = self.default_force_zeros if force_zeros_for_empty_prompt is None \
            else bool(force_zeros_for_empty_prompt)
        self._uncond_text = None

    # ------------------------------------------------------------------ the teacher's folder and weights

    @classmethod
    def denoiser_class(cls):
        import diffusers

        return getattr(diffusers, cls.denoiser_class_name)

    @classmethod
    def check_folder(cls, local, denoiser_config, flag="--pretrained_teacher_model"):
        """ConfigError (one line) when a local teacher folder lacks a part this family loads."""
        parts = (("vae", "config.json"), ("scheduler", "scheduler_config.json")) + tuple(
            (part, "config.json" if part.startswith("text_encoder") else None)
            for pair in cls.text_parts for part in pair)
        for sub, fname in parts:
            folder = os.path.join(local, sub)
            if not os.path.isdir(folder) or (fname and not os.path.isfile(os.path.join(folder, fname))):
                raise ConfigError(f"{flag}: '{local}' has {cls.missing_part_context(denoiser_config)}no "
                                  f"{sub}/{fname or ''}; pass a complete diffusers-format {cls.name} folder")

    @staticmethod
    def min_latent_side(denoiser_config):
        """The smallest latent side the denoiser samples at: one latent pixel left after its downsamplings (a
        smaller latent is padded up, and trains on padding)."""
        return 2 ** (len(denoiser_config.get("block_out_channels", (0,))) - 1)

    @staticmethod
    def latent_side_problem(denoiser_config, latent_side):
        """What is wrong with a latent of this side for the denoiser (a sentence ending in the fix), or None."""
        return None

    @classmethod
    def missing_part_context(cls, denoiser_config):
        """What the folder was recognised as, for the missing-part error (empty for the base family)."""
        return ""

    @classmethod
    def pipeline_loading_extras(cls, path, without_t5=False):
        """from_pretrained's extra components (as source text) that the folder at `path` needs to load."""
        return {}

    @classmethod
    def load_pipeline(cls, path, without_t5=False, **components):
        """The stock pipeline of a teacher or training output folder as a user loads it, progress bar off."""
        extras = {name: None for name in cls.pipeline_loading_extras(path, without_t5)}
        pipe = cls.pipeline_class().from_pretrained(path, **cls.pipeline_loading_kwargs, **{**extras, **components})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def load_denoiser(cls, path, src):
        """The teacher's denoiser (fp32, as stored) from a folder or Hub id."""
        return cls.denoiser_class().from_pretrained(path, subfolder=cls.denoiser_folder, **src)

    @classmethod
    def noise_scheduler_config(cls, path, src):
        """The noise scheduler's config (dict) alone: its prediction type and schedule, no weights."""
        import diffusers

        return getattr(diffusers, cls.noise_scheduler_class_name).load_config(path, subfolder="scheduler", **src)

    @staticmethod
    def prediction_type(noise_scheduler_config):
        """What the denoiser's output is (epsilon, v_prediction, sample), from its noise scheduler's config."""
        return noise_scheduler_config.get("prediction_type", "epsilon")

    @classmethod
    def load_noise_scheduler(cls, path, src):
        import diffusers

        return getattr(diffusers, cls.noise_scheduler_class_name).from_pretrained(path, subfolder="scheduler", **src)

    @staticmethod
    def scheduler(noise_scheduler, scheduler_cls, **overrides):
        """A scheduler of `scheduler_cls` on the teacher's schedule, with `overrides`."""
        # Only the keys the class takes (SDXL ships an Euler config whose sigma options LCM would warn about), and
        # only those the teacher's file set: the DDPMScheduler that loaded it filled in its own defaults, such as
        # clip_sample=True, which would make sampling clip the latents to [-1, 1].
        config = noise_scheduler.config
        defaults = set(config.get("_use_default_values", ()))
        accepted = set(inspect.signature(scheduler_cls.__init__).parameters) - defaults
        return scheduler_cls.from_config({k: v for k, v in config.items() if k in accepted}, **overrides)

    @classmethod
    def build_student(cls, teacher_denoiser, time_cond_proj_dim):
        """Student UNet = teacher weights + a w-embedding projection that starts at zero (student == teacher)."""
        config = dict(teacher_denoiser.config)
        # diffusers records which keys took their defaults and from_config re-applies those defaults, which would
        # drop the time_cond_proj_dim set below for a UNet built in memory (a loaded one has no such record).
        config.pop("_use_default_values", None)
        if config.get("time_cond_proj_dim") is None:
            config["time_cond_proj_dim"] = time_cond_proj_dim
        student = cls.denoiser_class().from_config(config)
        missing, unexpected = student.load_state_dict(teacher_denoiser.state_dict(), strict=False)
        if unexpected or any(not k.startswith("time_embedding.cond_proj.") for k in missing):
            raise RuntimeError(f"teacher and student UNet differ beyond cond_proj: {missing[:4]} {unexpected[:4]}")
        if missing:
            torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
            if student.time_embedding.cond_proj.bias is not None:
                torch.nn.init.zeros_(student.time_embedding.cond_proj.bias)
        return student.to(dtype=torch.float32)

    @staticmethod
    def guidance_note(w_min, w_max):
        """A warning when the distilled guidance w + 1 lies outside what this family samples with (None: fine)."""
        return None

    @staticmethod
    def guidance_embedding_dim(student):
        """Width of the student's w-embedding input (None: the student takes no w)."""
        return student.config.time_cond_proj_dim

    @staticmethod
    def denoise(model, z, t, cond, w_embedding=None):
        """The denoiser's raw output [B, C, h, w] at latents z [B, C, h, w] and times t [B]; `cond` is a dict of
        its keyword arguments, `w_embedding` [B, D] the student's guidance input (None: the model has none)."""
        if w_embedding is not None:
            return model(z, t, timestep_cond=w_embedding, **cond).sample
        return model(z, t, **cond).sample

    @staticmethod
    def discriminator_taps(denoiser):
        """The blocks the adversarial term's discriminator reads (adversarial.Tap): every down block, the middle
        block and every up block of the UNet, as PCM's discriminator does; widths from its config."""
        widths = list(denoiser.config.block_out_channels)
        taps = [Tap(block, width, 3, _first) for block, width in zip(denoiser.down_blocks, widths)]
        taps.append(Tap(denoiser.mid_block, widths[-1], 3, _itself))
        return taps + [Tap(block, width, 3, _itself) for block, width in zip(denoiser.up_blocks, reversed(widths))]

    # ------------------------------------------------------------------ text encoders and conditions

    @classmethod
    def text_folders(cls, path, without_t5=False):
        """The text encoders' folders this family encodes prompts with for the teacher at `path`."""
        return [encoder for _, encoder in cls.text_parts]

    @classmethod
    def load(cls, path, src, device, dtype, force_zeros_for_empty_prompt=None, without_t5=False):
        """Tokenizers and frozen text encoders from the teacher folder (or Hub id), in `dtype` on `device`."""
        from transformers import AutoTokenizer

        tokenizers, encoders = [], []
        for (tokenizer_folder, encoder_folder), encoder_cls in zip(cls.text_parts, cls.encoder_classes()):
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=tokenizer_folder, **src))
            encoder = encoder_cls.from_pretrained(path, subfolder=encoder_folder, **src)
            encoders.append(encoder.requires_grad_(False).eval().to(device, dtype=dtype))
        return cls(tokenizers, encoders, force_zeros_for_empty_prompt)

    @staticmethod
    def encoder_classes():
        from transformers import CLIPTextModel

        return (CLIPTextModel,)

    @property
    def device(self):
        return self.text_encoders[0].device

    def _token_ids(self, tokenizer, captions):
        return to_device(tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids, self.device)

    @torch.no_grad()
    def encode_text(self, captions):
        """Captions (B str) -> {"encoder_hidden_states": [B, 77, D]}: CLIP's last hidden state, as SD 1.x/2.x use."""
        ids = self._token_ids(self.tokenizers[0], captions)
        return {"encoder_hidden_states": self.text_encoders[0](ids)[0]}

    def set_unconditional_text(self, text, device):
        """Take the unconditional branch's text conditions [1, ...] as given (a precomputed shard's header), on the
        training device (the text encoders may be elsewhere)."""
        self._uncond_text = {k: v.to(device) for k, v in text.items()}

    def unconditional_text(self):
        """Text conditions [1, ...] of the teacher's unconditional branch: zeros when the family forces them."""
        if self._uncond_text is None:
            encoded = self.encode_text([""])
            self._uncond_text = {k: torch.zeros_like(v) for k, v in encoded.items()} if self.force_zeros else encoded
        return self._uncond_text

    def added_conditions(self, batch, resolution, fixed_crop_and_size):
        """Denoiser keyword arguments besides the text (none for SD)."""
        return {}

    def conditions(self, batch, resolution, fixed_crop_and_size=False):
        """(cond, uncond) denoiser keyword dicts of a batch; an empty caption is conditioned like the uncond branch
        (so --proportion_empty_prompts trains exactly the unconditional input the teacher's CFG uses). A batch of
        precomputed shards brings its text conditions ("text"): the encoders are not run."""
        captions = batch["captions"]
        uncond_text = self.unconditional_text()
        device = uncond_text["encoder_hidden_states"].device
        if "text" in batch:
            text = {k: to_device(v, device) for k, v in batch["text"].items()}
        else:
            text = self.encode_text(captions)
        if not all(captions):  # decided on the host: no wait for the device
            empty = to_device(torch.tensor([not c for c in captions]), device)
            text = {k: torch.where(empty.view(-1, *[1] * (v.ndim - 1)), uncond_text[k].to(v), v)
                    for k, v in text.items()}
        added = self.added_conditions(batch, resolution, fixed_crop_and_size)
        return self._assemble(text, added), self._assemble(uncond_text, added)

    def _assemble(self, text, added):
        return dict(text)

    # ------------------------------------------------------------------ the stock pipeline

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    def pipeline(self, vae, denoiser, scheduler):
        """A stock pipeline from these text parts and the given VAE, denoiser and scheduler, progress bar off."""
        pipe = self.pipeline_class()(vae=vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                                     unet=denoiser, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def save_lora(cls, folder, layers, adapter_metadata):
        """Adapters {peft name: tensor} of the denoiser in the format the stock pipeline's load_lora_weights reads."""
        cls.pipeline_class().save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True,
                                               unet_lora_adapter_metadata=adapter_metadata)
