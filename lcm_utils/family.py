"""Model families: what differs between SD 1.x/2.x and SDXL teachers, as one small object each.

A family knows how captions become UNet conditions (text encoders, pooled embeddings, added time ids),
what the unconditional branch of the teacher's CFG is, and which stock pipeline samples the result. The loop
and the objective only see the condition dicts it returns, so they never ask which family they train.

The teacher's folder says which family it is: a UNet with `addition_embed_type: text_time` (SDXL, SSD-1B,
Vega and their fine-tunes) takes pooled text embeddings and micro-conditioning time ids from two text
encoders; a UNet without added embeddings is SD 1.x/2.x. Every dimension comes from the loaded configs.
"""

import torch

from .config import ConfigError


class StableDiffusion:
    """SD 1.x/2.x: one CLIP text encoder, its last hidden state; the unconditional branch encodes ""."""

    name = "SD 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    uses_original_size = False  # no micro-conditioning: the samples' original sizes are not read
    text_parts = (("tokenizer", "text_encoder"),)  # (tokenizer folder, text encoder folder) per encoder
    default_force_zeros = False  # the SD pipelines always encode the empty negative prompt

    def __init__(self, tokenizers, text_encoders, force_zeros_for_empty_prompt=None):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.force_zeros = self.default_force_zeros if force_zeros_for_empty_prompt is None \
            else bool(force_zeros_for_empty_prompt)
        self._uncond_text = None

    @classmethod
    def load(cls, path, src, device, dtype, force_zeros_for_empty_prompt=None):
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
        from .teacher import to_device

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
        """UNet keyword arguments besides the text (none for SD)."""
        return {}

    def conditions(self, batch, resolution, fixed_crop_and_size=False):
        """(cond, uncond) UNet keyword dicts of a batch; an empty caption is conditioned like the uncond branch
        (so --proportion_empty_prompts trains exactly the unconditional input the teacher's CFG uses). A batch of
        precomputed shards brings its text conditions ("text"): the encoders are not run."""
        from .teacher import to_device

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

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline(self, vae, unet, scheduler):
        """A stock pipeline from these text parts and the given VAE, UNet and scheduler, progress bar off."""
        pipe = self.pipeline_class()(vae=vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                                     unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP encoders (penultimate hidden states concatenated), the second's pooled output, and
    micro-conditioning time ids, exactly as `StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids`."""

    name = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    uses_original_size = True
    text_parts = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    default_force_zeros = True  # StableDiffusionXLPipeline's default when model_index.json does not say

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
        from .teacher import to_device

        return {"time_ids": to_device(time_ids(batch["original_sizes"], batch["crop_top_lefts"], resolution,
                                               fixed_crop_and_size), self.unconditional_text()["text_embeds"].device)}

    def _assemble(self, text, added):
        # Broadcast a [1, ...] unconditional text to the batch; the time ids are the batch's (the pipeline's
        # negative time ids equal the positive ones unless a user passes negative sizes).
        batch = added["time_ids"].shape[0]
        # The time ids stay float32 (the UNet projects them in float32): in bf16, 1366 px would read as 1368.
        return {"encoder_hidden_states": text["encoder_hidden_states"].expand(batch, -1, -1),
                "added_cond_kwargs": {"text_embeds": text["text_embeds"].expand(batch, -1),
                                      "time_ids": added["time_ids"]}}

    def pipeline(self, vae, unet, scheduler):
        pipe = self.pipeline_class()(vae=vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                                     tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=unet,
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


FAMILIES = {None: StableDiffusion, "text_time": StableDiffusionXL}  # by the UNet's addition_embed_type


def family_of(unet_config, source="the teacher's unet/config.json"):
    """The family class for a UNet config (dict); ConfigError for added embeddings no family here takes."""
    kind = unet_config.get("addition_embed_type")
    if kind not in FAMILIES:
        known = ", ".join(repr(k) for k in FAMILIES if k) + " or none"
        raise ConfigError(f"--pretrained_teacher_model: {source} has addition_embed_type {kind!r}; this trainer "
                          f"takes SD 1.x/2.x and SDXL-family UNets ({known})")
    return FAMILIES[kind]
