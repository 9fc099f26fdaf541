"""SDXL teachers: prompt encoding and time ids against StableDiffusionXLPipeline, the objective on the SDXL
path, bad SDXL folders, and end-to-end runs of both scripts (shards, folder, datasets) loaded by stock pipelines."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RESOLUTION, ROOT, base_args, check_ok, launch, straight_and_resumed
from lcm_utils.data import DataSpec, TrainStream
from lcm_utils.families import StableDiffusionXL, time_ids
from lcm_utils.training import build_parser, main
from train_lcm_distill import FullDistillation

PROMPTS = ["a red square", "a blue circle on a yellow background", "x"]


def sdxl_args(sdxl_assets, out, teacher="sdxl", **overrides):
    flags = dict(train_data_dir=None, train_shards_path_or_url=sdxl_assets["shards_json"], max_train_samples=12)
    flags.update(overrides)
    return base_args({"teacher": sdxl_assets[teacher]}, out, teacher="teacher", **flags)


def load_family_teacher(path):
    from lcm_utils.families import load_teacher

    args = build_parser(FullDistillation, "x").parse_args(["--pretrained_teacher_model", path])
    return load_teacher(args, torch.device("cpu"), torch.float32)


def stock_pipeline(path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("teacher", ["sdxl", "sdxl_encoded_uncond"])
def test_prompt_embeddings_equal_the_pipelines(sdxl_assets, teacher):
    """cond, pooled and the unconditional branch (zeros when force_zeros_for_empty_prompt, else encoded "")."""
    loaded = load_family_teacher(sdxl_assets[teacher])
    assert isinstance(loaded.family, StableDiffusionXL)
    batch = {"captions": PROMPTS, "original_sizes": torch.tensor([[20, 30]] * 3),
             "crop_top_lefts": torch.tensor([[0, 4]] * 3)}
    cond, uncond = loaded.family.conditions(batch, RESOLUTION)
    pipe = stock_pipeline(sdxl_assets[teacher])
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    # The unconditional text is encoded once, for one prompt (a batch of B "" can differ from it in the last bit).
    _, neg_embeds, _, neg_pooled = pipe.encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=True)
    neg_embeds, neg_pooled = neg_embeds.expand(3, -1, -1), neg_pooled.expand(3, -1)
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(uncond["encoder_hidden_states"], neg_embeds)
    assert torch.equal(uncond["added_cond_kwargs"]["text_embeds"], neg_pooled)
    assert (neg_pooled.abs().sum() == 0) == (teacher == "sdxl")
    # The unconditional branch takes the batch's time ids, as the pipeline's negative time ids equal the positive.
    assert torch.equal(uncond["added_cond_kwargs"]["time_ids"], cond["added_cond_kwargs"]["time_ids"])

    # --proportion_empty_prompts: an emptied caption is conditioned exactly as the unconditional branch.
    emptied, _ = loaded.family.conditions(dict(batch, captions=["", PROMPTS[1], ""]), RESOLUTION)
    for key, got, want in (("hidden", emptied["encoder_hidden_states"], neg_embeds),
                           ("pooled", emptied["added_cond_kwargs"]["text_embeds"], neg_pooled)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), key
    assert torch.equal(emptied["encoder_hidden_states"][1], embeds[1])


def write_landscape_folder(folder, width=40, height=24, count=8):
    """Non-square images with a horizontal gradient (so a flip and a crop are visible in the pixels)."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(count):
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 120, height, dtype=np.float32)[:, None, None]
        pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                                 np.full((height, width, 1), 10.0 * i)], axis=2)
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
        rows.append({"file_name": f"{i}.png", "text": f"gradient {i}"})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def test_time_ids_equal_the_pipelines_on_a_random_crop_and_flip(sdxl_assets, tmp_path):
    """The data stream's original size and crop, turned into time ids, equal the pipeline's _get_add_time_ids; the
    crop named for a flipped sample is where the kept pixels sit in the flipped, resized image."""
    folder = write_landscape_folder(str(tmp_path / "wide"))
    spec = DataSpec(train_data_dir=folder, resolution=RESOLUTION, random_flip=True, train_batch_size=8, seed=5)
    batch = next(iter(TrainStream(spec)))
    pipe = stock_pipeline(sdxl_assets["sdxl"])
    ids = time_ids(batch["original_sizes"], batch["crop_top_lefts"], RESOLUTION)
    flipped = 0
    for i in range(8):
        original, crop = tuple(batch["original_sizes"][i].tolist()), tuple(batch["crop_top_lefts"][i].tolist())
        assert original == (24, 40)
        expected = pipe._get_add_time_ids(original, crop, (RESOLUTION, RESOLUTION), torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(ids[i:i + 1], expected)
        index = int(batch["captions"][i].split()[-1])
        resized = Image.open(os.path.join(folder, f"{index}.png")).resize((27, 16), Image.Resampling.BILINEAR)
        top, left = crop
        kept = (batch["pixel_values"][i].permute(1, 2, 0).numpy() + 1) * 127.5
        plain = np.asarray(resized, dtype=np.float32)[top:top + RESOLUTION, left:left + RESOLUTION]
        mirrored = np.asarray(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                              dtype=np.float32)[top:top + RESOLUTION, left:left + RESOLUTION]
        is_flipped = np.abs(kept - mirrored).max() < np.abs(kept - plain).max()
        flipped += is_flipped
        assert np.abs(kept - (mirrored if is_flipped else plain)).max() < 2.0
    assert 0 < flipped < 8
    fixed = time_ids(batch["original_sizes"], batch["crop_top_lefts"], RESOLUTION, fixed_crop_and_size=True)
    assert fixed.tolist() == [[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * 8


def test_original_size_comes_from_laion_metadata(sdxl_assets):
    from lcm_utils.tiny import laion_metadata

    spec = DataSpec(train_shards_path_or_url=sdxl_assets["shards_json"], resolution=RESOLUTION, train_batch_size=12,
                    shuffle_buffer_size=0, seed=0)
    batch = next(iter(TrainStream(spec)))
    sizes = sorted(map(tuple, batch["original_sizes"].tolist()))
    expected = sorted((m["original_height"], m["original_width"]) for m in map(laion_metadata, range(12)))
    assert sizes == expected


def test_lcd_loss_on_the_sdxl_path_equals_a_direct_computation(sdxl_assets):
    """Our conditions, student and objective against the same quantities built from StableDiffusionXLPipeline's
    own pieces (encode_prompt, _get_add_time_ids, get_guidance_scale_embedding) and DDIMScheduler/LCMScheduler."""
    from diffusers import DDIMScheduler, LCMScheduler

    from lcm_utils.consistency import guidance_embedding, sample_timestep_pairs
    from lcm_utils.families import StableDiffusionXL as family
    from lcm_utils.objectives import SolverSchedule, lcd_loss

    build_student = family.build_student

    loaded = load_family_teacher(sdxl_assets["sdxl"])
    student = build_student(loaded.denoiser, 256)
    target = build_student(loaded.denoiser, 256)
    with torch.no_grad():  # a student and target that differ from the teacher and use w
        for i, net in enumerate((student, target)):
            g = torch.Generator().manual_seed(10 + i)
            for p in net.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    batch = {"captions": PROMPTS, "original_sizes": torch.tensor([[20, 30], [1024, 768], [16, 16]]),
             "crop_top_lefts": torch.tensor([[0, 4], [3, 0], [0, 0]])}
    cond, uncond = loaded.family.conditions(batch, RESOLUTION)
    w = torch.tensor([3.0, 8.0, 12.0])
    schedule = SolverSchedule.from_scheduler(loaded.noise_scheduler, 50, 10.0, "cpu")
    emb = lambda w_: guidance_embedding(w_, 256)  # noqa: E731
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = lcd_loss(z0, cond, uncond, w,
                        lambda z, t, c, w_: student(z, t, timestep_cond=emb(w_), **c).sample,
                        lambda z, t, c: loaded.denoiser(z, t, **c).sample,
                        lambda z, t, c, w_: target(z, t, timestep_cond=emb(w_), **c).sample,
                        schedule, "l2", None, torch.Generator().manual_seed(7))

    pipe = stock_pipeline(sdxl_assets["sdxl"])
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    ids = torch.cat([pipe._get_add_time_ids(tuple(o), tuple(c), (RESOLUTION, RESOLUTION), torch.float32,
                                            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
                     for o, c in zip(batch["original_sizes"].tolist(), batch["crop_top_lefts"].tolist())])
    w_emb = pipe.get_guidance_scale_embedding(w, embedding_dim=256)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(50)
    lcm = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=10.0)
    r = torch.Generator().manual_seed(7)  # replay the draws
    start, end = sample_timestep_pairs(schedule.grid, schedule.k, 3, r)
    noise = torch.randn(z0.shape, generator=r)
    acp = ddim.alphas_cumprod
    a = lambda t: acp[t].sqrt()[:, None, None, None]  # noqa: E731
    s = lambda t: (1 - acp[t]).sqrt()[:, None, None, None]  # noqa: E731
    z_s = a(start) * z0 + s(start) * noise
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": ids}
        out_c = pipe.unet(z_s, start, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        out_u = pipe.unet(z_s, start, encoder_hidden_states=neg_embeds,
                          added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": ids}).sample
        guided = out_c + w[:, None, None, None] * (out_c - out_u)
        z_t = torch.cat([ddim.step(guided[i:i + 1], int(start[i]), z_s[i:i + 1], eta=0.0).prev_sample
                         for i in range(3)])

        def f(net, z, t):
            out = net(z, t, encoder_hidden_states=embeds, added_cond_kwargs=added, timestep_cond=w_emb).sample
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
            return c_skip[:, None, None, None] * z + c_out[:, None, None, None] * (z - s(t) * out) / a(t)

        expected = ((f(student, z_s, start) - f(target, z_t, end)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- bad SDXL input


def error_of(argv, capsys, method=FullDistillation):
    with pytest.raises(SystemExit) as info:
        main(method, "test", argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def broken_copy(sdxl_assets, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(sdxl_assets["sdxl"], folder)
    edit(folder)
    return str(folder)


def edit_unet_config(**changes):
    def edit(folder):
        path = folder / "unet" / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("edit, expected", [
    (lambda f: shutil.rmtree(f / "text_encoder_2"), "has an SDXL UNet (addition_embed_type 'text_time') but no "
                                                    "text_encoder_2/config.json"),
    (lambda f: shutil.rmtree(f / "tokenizer_2"), "no tokenizer_2/"),
    (edit_unet_config(addition_embed_type="image"), "addition_embed_type 'image'"),
    (edit_unet_config(projection_class_embeddings_input_dim=2816), "projection_class_embeddings_input_dim is 2816"),
    (edit_unet_config(cross_attention_dim=2048), "cross_attention_dim 2048"),
])
def test_bad_sdxl_teachers_fail_before_loading(sdxl_assets, tmp_path, capsys, edit, expected):
    teacher = broken_copy(sdxl_assets, tmp_path, edit)
    err = error_of(sdxl_args(sdxl_assets, str(tmp_path / "out"), pretrained_teacher_model=teacher) + ["--dry_run"],
                   capsys)
    assert "--pretrained_teacher_model" in err and expected in err


def test_every_sample_filtered_stops_with_the_filters_name(sdxl_assets, tmp_path, capsys):
    err = error_of(sdxl_args(sdxl_assets, str(tmp_path / "out"), min_aesthetic_score=9.5) + ["--dry_run"], capsys)
    assert "no usable samples" in err and "filtered_min_aesthetic_score: " in err
    assert "loosen or unset --min_aesthetic_score" in err


# ----------------------------------------------------------------------------- end to end


def sample_with_stock_pipeline(pipe, steps=2, guidance=6.0):
    image = pipe("a red square", num_inference_steps=steps, guidance_scale=guidance, height=RESOLUTION,
                 width=RESOLUTION, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    return image


def test_full_sdxl_from_laion_shards_resumes_exactly_and_loads_in_the_stock_pipeline(sdxl_assets, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    def make_args(out):
        return sdxl_args(sdxl_assets, out, max_train_steps=4, checkpointing_steps=2, validation_steps=4,
                         random_flip=True, max_watermark_probability=0.8, min_original_size=400,
                         proportion_empty_prompts=0.25)

    straight, resumed = straight_and_resumed("train_lcm_distill.py", make_args, tmp_path,
                                             after=("checkpoint-4", "unet", "unet_target"))
    for sub in ("unet", "unet_target"):
        a = load_file(os.path.join(straight, sub, "diffusion_pytorch_model.safetensors"))
        b = load_file(os.path.join(resumed, sub, "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    assert os.path.isfile(os.path.join(straight, "validation", "step-000004.png"))
    # SDXL ships an Euler config without clip_sample: the exported LCMScheduler must not clip the latents.
    exported = json.load(open(os.path.join(straight, "scheduler", "scheduler_config.json")))
    assert exported["clip_sample"] is False and "use_karras_sigmas" not in exported
    card = open(os.path.join(straight, "README.md")).read()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and sdxl_assets["sdxl"] in card

    unet = UNet2DConditionModel.from_pretrained(straight, subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(straight, subfolder="scheduler")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_assets["sdxl"], unet=unet, scheduler=scheduler,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    sample_with_stock_pipeline(pipe)


def write_dataset(folder, num=12):
    """A save_to_disk dataset: image (datasets.Image), a caption column, LAION-style score columns."""
    import datasets

    from lcm_utils.tiny import laion_metadata, toy_sample

    rows = {"image": [], "caption": [], "original_height": [], "original_width": [], "aesthetic": []}
    for i in range(num):
        image, caption = toy_sample(i, RESOLUTION + 4)
        meta = laion_metadata(i)
        for key, value in (("image", image), ("caption", caption), ("original_height", meta["original_height"]),
                           ("original_width", meta["original_width"]), ("aesthetic", meta["aesthetic"])):
            rows[key].append(value)
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(folder)
    return folder


def test_lora_sdxl_from_a_dataset_on_two_processes_loads_with_load_lora_weights(sdxl_assets, tmp_path):
    from diffusers import LCMScheduler

    data = write_dataset(str(tmp_path / "dataset"))
    out = str(tmp_path / "lora")
    args = sdxl_args(sdxl_assets, out, train_shards_path_or_url=None, max_train_samples=None, dataset_name=data,
                     caption_column="caption", lora_rank=4, lora_alpha=8, learning_rate=1e-2, max_train_steps=2,
                     validation_steps=2, min_aesthetic_score=3.5)
    result = launch("train_lcm_lora.py", args, num_processes=2)
    check_ok(result)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert os.path.isfile(os.path.join(out, "validation", "step-000002.png"))
    pipe = stock_pipeline(sdxl_assets["sdxl"])
    pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")
    base = sample_with_stock_pipeline(pipe, guidance=1.0)
    pipe.load_lora_weights(out)
    adapted = sample_with_stock_pipeline(pipe, guidance=1.0)
    pipe.fuse_lora()
    fused = sample_with_stock_pipeline(pipe, guidance=1.0)
    assert np.abs(adapted - base).max() > 1e-4  # the adapters change the model...
    np.testing.assert_allclose(fused, adapted, atol=1e-4)  # ...and fusing keeps what they do


def test_full_sdxl_from_a_plain_folder_read_by_load_dataset_with_fixed_crop_and_size(sdxl_assets, assets, tmp_path):
    """--dataset_name on a folder of images + metadata.jsonl: datasets' imagefolder builder, through the script."""
    out = str(tmp_path / "out")
    args = sdxl_args(sdxl_assets, out, train_shards_path_or_url=None, max_train_samples=None,
                     dataset_name=assets["images"], cache_dir=str(tmp_path / "cache"), use_fix_crop_and_size=True,
                     max_train_steps=2)
    check_ok(launch("train_lcm_distill.py", args))
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_lora_sdxl_from_a_folder_resumes_exactly_with_an_ema_target(sdxl_assets, assets, tmp_path):
    from safetensors.torch import load_file

    def make_args(out):
        return sdxl_args(sdxl_assets, out, train_shards_path_or_url=None, max_train_samples=None,
                         train_data_dir=assets["images"], random_flip=True, lora_rank=4, lora_alpha=8,
                         learning_rate=1e-2, ema_decay=0.9, max_train_steps=4, checkpointing_steps=2)

    straight, resumed = straight_and_resumed("train_lcm_lora.py", make_args, tmp_path,
                                             after=("checkpoint-4", "ema", "pytorch_lora_weights.safetensors"))
    for name in ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"):
        a, b = load_file(os.path.join(straight, name)), load_file(os.path.join(resumed, name))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_the_real_sdxl_configs_pass_the_family_checks(tmp_path, monkeypatch):
    """SDXL base's own component configs (benchmarks/configs/sdxl, what --sdxl_shape builds) are read as SDXL and
    their dimensions agree, with nothing hard-coded; the UNet they describe has SDXL's 2.57 B parameters."""
    from diffusers import UNet2DConditionModel

    from lcm_utils.config import check_teacher
    from lcm_utils.families import family_of

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from lora_memory import SDXL_CONFIGS, sdxl_config

    folder = tmp_path / "sdxl-configs"
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                      ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json"),
                      ("tokenizer", None), ("tokenizer_2", None)):
        (folder / sub).mkdir(parents=True)
        if name:
            shutil.copy(os.path.join(SDXL_CONFIGS, f"{sub}_config.json"), folder / sub / name)
    args = build_parser(FullDistillation, "x").parse_args(["--pretrained_teacher_model", str(folder)])
    scheduler_cfg, vae_cfg = check_teacher(args)
    assert scheduler_cfg["num_train_timesteps"] == 1000 and vae_cfg["scaling_factor"] == 0.13025
    assert family_of(sdxl_config("unet")) is StableDiffusionXL
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_config("unet"))
    assert 2.55e9 < sum(p.numel() for p in unet.parameters()) < 2.58e9


def test_vae_precision_follows_force_upcast_and_a_given_vae_runs_low(sdxl_assets, tmp_path):
    """A VAE whose config sets force_upcast (SDXL's and SD's own) stays fp32, the teacher's or one given with
    --pretrained_vae_model_name_or_path; one without it (the fp16-fix VAE) runs in the low precision."""
    from lcm_utils.families import load_teacher

    def vae_dtype(teacher, *extra):
        args = build_parser(FullDistillation, "x").parse_args(["--pretrained_teacher_model", teacher, *extra])
        return load_teacher(args, torch.device("cpu"), torch.bfloat16).vae.dtype

    assert vae_dtype(sdxl_assets["sdxl"]) == torch.float32
    safe_vae = tmp_path / "vae-fp16-fix"
    shutil.copytree(os.path.join(sdxl_assets["sdxl"], "vae"), safe_vae)
    config = json.loads((safe_vae / "config.json").read_text())
    (safe_vae / "config.json").write_text(json.dumps(dict(config, force_upcast=False)))
    assert vae_dtype(sdxl_assets["sdxl"], "--pretrained_vae_model_name_or_path", str(safe_vae)) == torch.bfloat16
    no_upcast = broken_copy(sdxl_assets, tmp_path, lambda f: shutil.copy(safe_vae / "config.json", f / "vae"))
    assert vae_dtype(no_upcast) == torch.bfloat16
    # A given VAE that asks for fp32 (SDXL's own, by path) gets it too.
    own_vae = os.path.join(sdxl_assets["sdxl"], "vae")
    assert vae_dtype(sdxl_assets["sdxl"], "--pretrained_vae_model_name_or_path", own_vae) == torch.float32


def test_a_bad_dataset_column_is_reported_before_any_model_loads(sdxl_assets, tmp_path, capsys, monkeypatch):
    import lcm_utils.training.setup as training

    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the data was checked")

    monkeypatch.setattr(training, "load_teacher", no_loading)
    data = write_dataset(str(tmp_path / "dataset"), num=2)
    capsys.readouterr()  # the dataset's own progress bars
    argv = sdxl_args(sdxl_assets, str(tmp_path / "out"), train_shards_path_or_url=None, max_train_samples=None,
                     dataset_name=data, caption_column="captions")
    try:
        err = error_of(argv, capsys)
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    assert "--caption_column: 'captions' is not a column of --dataset_name" in err
