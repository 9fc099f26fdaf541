"""Flags, config files and bad input: one clear line and exit 2 before any UNet loads (in-process, fast)."""

import os
import shutil

import pytest
import yaml

from conftest import ROOT, base_args
from lcm_utils.training import main
from train_lcm_distill import FullDistillation


def run_main(argv):
    return main(FullDistillation, "test", argv)


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def args(assets, tmp_path):
    return base_args(assets, str(tmp_path / "out"))


def with_flags(argv, **flags):
    """Replace or add flags in an argv list."""
    out = list(argv)
    for key, value in flags.items():
        flag = f"--{key}"
        if flag in out:
            i = out.index(flag)
            del out[i:i + 2]
        if value is not None:
            out += [flag, str(value)]
    return out


@pytest.mark.parametrize("flags, expected", [
    (dict(pretrained_teacher_model="./no/such/teacher"), "--pretrained_teacher_model: folder './no/such/teacher' does not exist"),
    (dict(w_min=9, w_max=3), "--w_min"),
    (dict(num_ddim_timesteps=30), "--num_ddim_timesteps (30) must divide"),
    (dict(resolution=15), "--resolution (15) must be a multiple of 8 (8 for the pipelines, 2 for the VAE's "
                          "latents); try 16"),
    (dict(resolution=28), "--resolution (28) must be a multiple of 8"),
    (dict(max_train_steps=0), "--max_train_steps must be a positive integer"),
    (dict(train_batch_size=-1), "--train_batch_size must be > 0"),
    (dict(resume_from_checkpoint="checkpoint-7"), "--resume_from_checkpoint: 'checkpoint-7' does not exist"),
    (dict(proportion_empty_prompts=1.5), "--proportion_empty_prompts"),
    (dict(train_data_dir=None), "no training data"),
    (dict(lora_rank=8), "--lora_rank is not a flag of full LCM distillation; use train_lcm_lora.py"),
    (dict(adv_weight=-0.1), "--adv_weight must be >= 0"),
    (dict(adv_weight=0.1, adv_lr=0), "--adv_lr must be positive"),
    (dict(adv_real="fake"), "--adv_real"),
    (dict(adv_timesteps="high"), "--adv_timesteps"),
    (dict(adv_fake="x0"), "--adv_fake x0 needs --adv_real data"),
])
def test_bad_flags_fail_fast(args, capsys, flags, expected):
    err = error_of(with_flags(args, **flags), capsys)
    assert expected in err


def test_unknown_loss_type_is_rejected(args, capsys):
    assert "argument --loss_type: invalid choice: 'l1'" in error_of(with_flags(args, loss_type="l1"), capsys)


def test_teacher_without_unet(assets, args, tmp_path, capsys):
    broken = tmp_path / "broken_teacher"
    shutil.copytree(assets["teacher_eps"], broken)
    shutil.rmtree(broken / "unet")
    err = error_of(with_flags(args, pretrained_teacher_model=broken), capsys)
    assert "has no unet/" in err


def test_missing_shards_and_empty_folder(args, tmp_path, capsys):
    err = error_of(with_flags(args, train_data_dir=None, train_shards_path_or_url=tmp_path / "x-{000..003}.tar",
                              max_train_samples=8), capsys)
    assert "--train_shards_path_or_url" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = error_of(with_flags(args, train_data_dir=empty), capsys)
    assert "--train_data_dir" in err


def test_shards_need_a_length(args, assets, capsys):
    argv = with_flags(args, train_data_dir=None, train_shards_path_or_url=assets["shards"], max_train_steps=None)
    assert "--max_train_steps is required" in error_of(argv, capsys)


def test_yaml_config_and_override(assets, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"pretrained_teacher_model": assets["teacher_eps"],
                                   "train_data_dir": assets["images"], "resolution": 16, "train_batch_size": 2,
                                   "w_min": 2, "validation_prompts": ["a", "b"], "center_crop": True}))
    out = tmp_path / "out"
    assert run_main(["--config", str(cfg), "--output_dir", str(out), "--w_min", "3", "--dry_run"]) == 0
    text = capsys.readouterr().out
    resolved = yaml.safe_load(text.split("first batch")[0])
    assert resolved["w_min"] == 3.0 and resolved["center_crop"] is True and resolved["validation_prompts"] == ["a", "b"]
    assert "dry run OK" in text
    assert not os.path.exists(out / "unet")


def test_yaml_unknown_key_and_bad_value(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learning_rat: 1e-4\n")
    assert "unknown key 'learning_rat'" in error_of(["--config", str(cfg)], capsys)
    cfg.write_text("loss_type: l1\n")
    assert "'loss_type'" in error_of(["--config", str(cfg)], capsys)
    assert "does not exist" in error_of(["--config", str(tmp_path / "nope.yaml")], capsys)


def test_push_to_hub_fails_clearly_when_the_hub_is_unreachable(args, capsys):
    """Offline (as in CI) the repo cannot be created: one line before any model loads, not a crash at the end."""
    from accelerate.state import AcceleratorState

    try:
        err = error_of(args + ["--push_to_hub", "--hub_model_id", "someone/lcm-test"], capsys)
    finally:
        AcceleratorState._reset_state(True)
    assert err.startswith("error: --push_to_hub: cannot create the Hub repo")


# The flags of diffusers' train_lcm_distill_sd_wds.py (an AST walk over its add_argument calls, 2026-08).
DIFFUSERS_FULL_FLAGS = """pretrained_teacher_model pretrained_vae_model_name_or_path teacher_revision revision output_dir
cache_dir seed logging_dir report_to checkpointing_steps checkpoints_total_limit resume_from_checkpoint
train_shards_path_or_url resolution interpolation_type center_crop random_flip dataloader_num_workers
train_batch_size num_train_epochs max_train_steps max_train_samples learning_rate scale_lr lr_scheduler
lr_warmup_steps gradient_accumulation_steps use_8bit_adam adam_beta1 adam_beta2 adam_weight_decay adam_epsilon
max_grad_norm proportion_empty_prompts w_min w_max num_ddim_timesteps loss_type huber_c unet_time_cond_proj_dim
vae_encode_batch_size timestep_scaling_factor ema_decay mixed_precision allow_tf32 cast_teacher_unet
enable_xformers_memory_efficient_attention gradient_checkpointing local_rank validation_steps push_to_hub
hub_token hub_model_id tracker_project_name""".split()


def test_every_diffusers_flag_is_accepted():
    from lcm_utils.training import build_parser

    dests = {a.dest for a in build_parser(FullDistillation, "x")._actions}
    assert sorted(set(DIFFUSERS_FULL_FLAGS) - dests) == []


def test_dataset_with_no_usable_sample_stops_with_an_error(args, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
        (bad / f"{i}.txt").write_text("a caption")
    err = error_of(with_flags(args, train_data_dir=bad) + ["--dry_run"], capsys)
    assert "no usable samples" in err and "bad_image: 3" in err


def test_yaml_key_of_the_other_script_points_to_it(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lora_rank: 8\n")
    err = error_of(["--config", str(cfg)], capsys)
    assert "'lora_rank'" in err and "use train_lcm_lora.py" in err


def test_seed_is_drawn_recorded_and_kept_on_resume(assets, tmp_path):
    """Without --seed a seed is drawn; a resume reuses the checkpoint's, so the written config reproduces the run."""
    from accelerate.state import AcceleratorState

    out = tmp_path / "out"
    argv = with_flags(base_args(assets, str(out), max_train_steps=1, checkpointing_steps=1), seed=None)
    try:
        run_main(argv)
        first = yaml.safe_load((out / "training_config.yaml").read_text())["seed"]
        run_main(with_flags(argv, max_train_steps=2, resume_from_checkpoint="latest"))
    finally:
        AcceleratorState._reset_state(True)
    assert isinstance(first, int)
    assert yaml.safe_load((out / "training_config.yaml").read_text())["seed"] == first


@pytest.mark.parametrize("name", ["sd15_lcm.yaml", "sd21_768_lcm.yaml", "sd15_lcm_lora.yaml", "demo.yaml",
                                  "demo-lora.yaml", "sdxl_lcm.yaml", "sdxl_lcm_lora.yaml"])
def test_shipped_presets_parse(name):
    """Every key of the presets is a flag of the script it is for, with a valid value."""
    from lcm_utils.config import parse_args
    from lcm_utils.training import build_parser
    from train_lcm_lora import LoraDistillation

    method = LoraDistillation if "lora" in name else FullDistillation
    args = parse_args(build_parser(method, "x"), ["--config", os.path.join(ROOT, "configs", name)])
    assert args.resume_from_checkpoint == "latest" and args.pretrained_teacher_model


# diffusers' SDXL scripts add these to the SD flags (an AST walk over their add_argument calls, HEAD 58eb52c0):
# train_lcm_distill_sdxl_wds.py and train_lcm_distill_lora_sdxl_wds.py add the first; the datasets script
# train_lcm_distill_lora_sdxl.py adds the rest (and drops the shards flag, which we keep).
DIFFUSERS_SDXL_EXTRA_FLAGS = ["use_fix_crop_and_size", "dataset_name", "dataset_config_name", "train_data_dir",
                              "image_column", "caption_column", "encode_batch_size"]


def test_every_diffusers_sdxl_flag_is_accepted_by_both_scripts():
    from lcm_utils.training import build_parser
    from test_train_lora import DIFFUSERS_LORA_ONLY_FLAGS
    from train_lcm_lora import LoraDistillation

    full = {a.dest for a in build_parser(FullDistillation, "x")._actions}
    lora = {a.dest for a in build_parser(LoraDistillation, "x")._actions}
    assert sorted(set(DIFFUSERS_FULL_FLAGS + DIFFUSERS_SDXL_EXTRA_FLAGS) - full) == []
    lora_flags = [f for f in DIFFUSERS_FULL_FLAGS if f not in ("unet_time_cond_proj_dim", "ema_decay")]
    assert sorted(set(lora_flags + DIFFUSERS_LORA_ONLY_FLAGS + DIFFUSERS_SDXL_EXTRA_FLAGS) - lora) == []


def test_encode_batch_size_sets_the_vae_encode_batch_size(args, capsys):
    assert run_main(args + ["--encode_batch_size", "3", "--dry_run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("first batch")[0])
    assert resolved["vae_encode_batch_size"] == 3


def test_help_shows_defaults_and_each_scripts_validation_guidance(capsys):
    from lcm_utils.training import build_parser
    from train_lcm_lora import LoraDistillation

    full = " ".join(build_parser(FullDistillation, "x").format_help().split())
    lora = " ".join(build_parser(LoraDistillation, "x").format_help().split())
    assert "AdamW learning rate (after warm-up). (default: 0.0001)" in full
    assert "--gradient_accumulation_steps GRADIENT_ACCUMULATION_STEPS Micro-batches per optimizer step. (default: 1)" \
        in full
    assert "(default: w_min + 1, so the student's w-embedding gets w_min; 1.0 for a student without one (SD3))" in full
    assert "(default: 1.0, no CFG, as LCM-LoRA samples)" in lora and "w_min + 1" not in lora.split("--report_to")[0] \
        .split("--validation_guidance_scale")[-1]


@pytest.mark.parametrize("typed, suggestion", [("--learning", "--learning_rate"), ("--learnin_rate", "--learning_rate"),
                                               ("--resolutoin", "--resolution")])
def test_abbreviations_are_refused_and_typos_get_the_nearest_flag(args, capsys, typed, suggestion):
    err = error_of(args + [typed, "1"], capsys)
    assert f"unrecognized arguments: {typed} 1; did you mean {suggestion} for {typed}?" in err


def test_a_relative_teacher_path_from_another_folder_is_one_line(args, tmp_path, monkeypatch, capsys):
    """'assets/shapes-teacher' from a folder where it does not exist looks like a Hub id; offline (as in CI) it
    cannot be fetched: the dry run says so in one line, naming the folder it looked in."""
    monkeypatch.chdir(tmp_path)
    err = error_of(with_flags(args, pretrained_teacher_model="assets/shapes-teacher") + ["--dry_run"], capsys)
    assert err.startswith(f"error: --pretrained_teacher_model: 'assets/shapes-teacher' is not a folder here "
                          f"({tmp_path}) and could not be loaded as a Hub model")


def test_a_wrong_yaml_key_gets_the_nearest_flag(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learning_rat: 1e-4\n")
    err = error_of(["--config", str(cfg)], capsys)
    assert err.endswith("unknown key 'learning_rat' in '" + str(cfg) + "'; keys are flag names without '--'; did you "
                        "mean 'learning_rate'?")
    cfg.write_text("zzzz: 1\n")
    assert "did you mean" not in error_of(["--config", str(cfg)], capsys)


def test_local_teacher_folders_are_saved_as_absolute_paths(args, assets, tmp_path, monkeypatch, capsys):
    """A teacher (and VAE) folder given relative to the working folder is resolved, so training_config.yaml and the
    model card name it from anywhere; a Hub id is left as typed."""
    from lcm_utils.config import validate
    from lcm_utils.training import build_parser

    teacher = assets["teacher_eps"]
    monkeypatch.chdir(os.path.dirname(teacher))
    relative = os.path.join(".", os.path.basename(teacher))
    argv = with_flags(args, pretrained_teacher_model=relative, pretrained_vae_model_name_or_path=f"{relative}/vae")
    assert run_main(argv + ["--dry_run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out.split("first batch")[0])
    assert resolved["pretrained_teacher_model"] == teacher
    assert resolved["pretrained_vae_model_name_or_path"] == os.path.join(teacher, "vae")
    hub = build_parser(FullDistillation, "x").parse_args(with_flags(args, pretrained_vae_model_name_or_path="org/vae"))
    validate(hub)  # a Hub id is not fetched by the checks
    assert hub.pretrained_vae_model_name_or_path == "org/vae"


@pytest.mark.parametrize("flags, expected", [
    (dict(w_min=9, w_max=3), "error: --w_min (9.0) must be >= 0 and <= --w_max (3.0)"),
    (dict(resolution=30), "error: --resolution (30) must be a multiple of 8"),
])
def test_under_the_quiet_launcher_a_user_error_is_one_line_and_status_1(args, flags, expected):
    """accelerate launch -q (how scripts/demo.sh runs): the script's one line, nothing else; accelerate turns the
    script's status 2 into 1, as the README says."""
    from conftest import launch

    result = launch("train_lcm_distill.py", with_flags(args, **flags), quiet=True)
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_validation_grids_reach_image_trackers_and_a_failing_one_only_warns(capsys):
    import numpy as np

    from lcm_utils.training import log_grid

    calls = []

    class Images:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def log_images(self, values, step=None):
            if self.fail:
                raise RuntimeError("server gone")
            calls.append((self.name, type(values["validation"]).__name__, step))

    class Accelerator:
        trackers = [Images("aim"), Images("clearml"), Images("swanlab", fail=True)]

    log_grid(Accelerator(), np.zeros((8, 8, 3), dtype=np.uint8), 7)
    assert calls == [("aim", "ndarray", 7), ("clearml", "list", 7)]
    assert "warning: the validation grid was not logged to swanlab (RuntimeError: server gone)" in capsys.readouterr().err


def test_on_several_processes_a_user_error_is_said_once(args):
    from conftest import launch

    result = launch("train_lcm_distill.py", with_flags(args, w_min=9, w_max=3), num_processes=2)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("error: --w_min (9.0) must be >= 0 and <= --w_max (3.0)") == 1, output[-3000:]


def test_on_several_processes_what_one_rank_found_is_said_by_that_rank(args, tmp_path):
    """One image for two processes: rank 1's reader has nothing to read, and rank 1 says so."""
    from conftest import launch
    from test_data import write_folder

    write_folder(tmp_path / "one", 1)
    result = launch("train_lcm_distill.py", with_flags(args, train_data_dir=tmp_path / "one"), num_processes=2)
    assert result.returncode != 0
    assert "error: [rank 1] --train_data_dir" in result.stdout + result.stderr and "got no samples" in result.stderr


def test_the_model_card_names_a_hub_teacher_as_base_model(tmp_path):
    import argparse

    from lcm_utils.families import StableDiffusionXL
    from lcm_utils.objectives import make_objective
    from lcm_utils.training import write_model_card
    from train_lcm_lora import LoraDistillation

    args = argparse.Namespace(pretrained_teacher_model="stabilityai/stable-diffusion-xl-base-1.0",
                              output_dir=str(tmp_path), w_min=3.0, w_max=15.0, num_ddim_timesteps=50,
                              loss_type="huber", objective="lcm", adv_weight=0.0)
    write_model_card(args, "usage", 1000, LoraDistillation, StableDiffusionXL, make_objective("lcm"))
    card = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert {"stable-diffusion-xl", "lora", "lcm-lora"} <= set(metadata["tags"]) and "# LCM-LoRA SDXL model" in card


def test_every_shipped_config_parses_with_its_script():
    """Each configs/*.yaml (not the accelerate ones) loads through its script's parser: keys are real flags of that
    script, values have the flags' types and choices."""
    import glob

    from lcm_utils.config import parse_args
    from lcm_utils.training import build_parser
    from train_lcm_distill import FullDistillation
    from train_lcm_lora import LoraDistillation

    configs = [p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
               if not os.path.basename(p).startswith("accelerate_")]
    assert len(configs) >= 10
    for path in configs:
        method = LoraDistillation if "lora" in os.path.basename(path) else FullDistillation
        foreign = (method.foreign_flags, "belongs to the other script")
        args = parse_args(build_parser(method, "x"), ["--config", path], foreign)
        assert args.pretrained_teacher_model, path
