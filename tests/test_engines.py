"""FSDP2 and DeepSpeed ZeRO-2/3 on two CPU processes over gloo, with the shipped accelerate configs: the student
trains as under DDP (the EMA target updated shard by shard, or gathered from ZeRO-3's partitions), checkpoints
hold full weights and resume exactly, an FSDP checkpoint also on another number of processes. accelerate turns
these engines on only for GPUs; tests/engine_on_cpu.py lets the CPU run take them."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_args, check_ok, launch, straight_and_resumed

FULL, LORA = "train_lcm_distill.py", "train_lcm_lora.py"
FSDP = "configs/accelerate_fsdp.yaml"
ZERO2 = "configs/accelerate_deepspeed_zero2.yaml"
# A larger Adam epsilon than the default: biases in front of a GroupNorm have a gradient of exactly zero in exact
# arithmetic, and 1e-8 would turn the rounding noise of a different reduction order into full-size steps.
COMMON = dict(max_train_steps=4, checkpointing_steps=2, adam_epsilon=1e-4, validation_steps=4)
LORA_FLAGS = dict(lora_rank=4, lora_alpha=8, max_train_steps=3, adam_epsilon=1e-4, validation_steps=3,
                  gradient_accumulation_steps=2)  # under DeepSpeed the flag must win over the config


def unet_weights(folder):
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


@pytest.fixture(scope="module")
def ddp(assets, tmp_path_factory):
    """The same runs under plain DDP (2 processes): the reference every engine must reproduce."""
    base = tmp_path_factory.mktemp("ddp")
    full, lora = str(base / "full"), str(base / "lora")
    check_ok(launch(FULL, base_args(assets, full, **COMMON), num_processes=2))
    check_ok(launch(LORA, base_args(assets, lora, **LORA_FLAGS), num_processes=2))
    teacher = unet_weights(os.path.join(assets["teacher_eps"], "unet"))
    for part in ("unet", "unet_target"):  # the runs trained: comparisons with them are not between two teachers
        assert max_diff(teacher, {k: v for k, v in unet_weights(os.path.join(full, part)).items() if k in teacher}) > 1e-4
    lora_weights = load_file(os.path.join(lora, "pytorch_lora_weights.safetensors"))
    assert max(t.abs().max().item() for name, t in lora_weights.items() if "lora_B" in name) > 1e-4  # B starts at 0
    return {"full": full, "lora": lora}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """configs/accelerate_deepspeed_zero3.yaml, except that every parameter is partitioned: by default ZeRO-3
    keeps parameters under 1e5 elements whole on each rank, which is every parameter of the tiny UNet."""
    import yaml

    base = tmp_path_factory.mktemp("zero3")
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                           "accelerate_deepspeed_zero3.yaml")) as f:
        config = yaml.safe_load(f)
    ds_file = str(base / "ds_config.json")
    with open(ds_file, "w") as f:
        json.dump({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                   "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                   "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}, f)
    config["deepspeed_config"] = {"deepspeed_config_file": ds_file, "zero3_init_flag": False}
    del config["mixed_precision"]  # the json's "auto" takes the launch's --mixed_precision
    path = str(base / "accelerate_zero3_all_partitioned.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def check_full_run(engine, assets, tmp_path, ddp, tolerance):
    """Straight and killed-then-resumed runs under `engine`: bit-equal to each other, within `tolerance` of DDP."""
    straight, resumed = straight_and_resumed(FULL, lambda out: base_args(assets, out, **COMMON), tmp_path,
                                             num_processes=2, engine=engine,
                                             after=("checkpoint-4", "unet", "unet_target"))
    for part in ("unet", "unet_target"):
        assert max_diff(unet_weights(os.path.join(straight, part)), unet_weights(os.path.join(resumed, part))) == 0
        # The same run up to the order of the gradient reductions.
        assert max_diff(unet_weights(os.path.join(straight, part)), unet_weights(os.path.join(ddp["full"], part))) \
            < tolerance, part
    assert os.path.isfile(os.path.join(straight, "validation", "step-000004.png"))  # sampled from gathered weights
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(straight, subfolder="unet")  # a stock folder
    assert student.config.time_cond_proj_dim is not None
    return straight


def test_full_distillation_under_fsdp_matches_ddp_and_resumes_exactly(assets, tmp_path, ddp):
    straight = check_full_run(FSDP, assets, tmp_path, ddp, 1e-6)
    assert os.path.isfile(os.path.join(straight, "checkpoint-2", "optimizer_fsdp.pt"))


def test_an_fsdp_checkpoint_resumes_on_one_process_and_not_without_fsdp(assets, tmp_path):
    out = str(tmp_path / "run")
    check_ok(launch(FULL, base_args(assets, out, **dict(COMMON, max_train_steps=2)), num_processes=2, engine=FSDP))
    saved = unet_weights(os.path.join(out, "checkpoint-2", "unet"))
    no_fsdp = str(tmp_path / "no_fsdp")
    shutil.copytree(out, no_fsdp)

    result = launch(FULL, base_args(assets, out, **COMMON) + ["--resume_from_checkpoint", "latest"], engine=FSDP)
    check_ok(result)
    assert "elastic resume" in result.stdout and "resumed from" in result.stdout
    assert max_diff(saved, unet_weights(os.path.join(out, "unet"))) > 1e-5  # it went on training from there
    assert os.path.isdir(os.path.join(out, "checkpoint-4"))

    expected = (f"error: --resume_from_checkpoint: '{no_fsdp}/checkpoint-2' was written under FSDP and this run is "
                "under {}: the optimizer state has another layout; relaunch with the accelerate config that wrote it")
    result = launch(FULL, base_args(assets, no_fsdp, **COMMON) + ["--resume_from_checkpoint", "latest"], quiet=True)
    assert result.returncode == 1  # the script's status 2, as accelerate's launcher reports it
    assert result.stderr.strip().splitlines() == [expected.format("DDP")]
    result = launch(FULL, base_args(assets, no_fsdp, **COMMON) + ["--resume_from_checkpoint", "latest"], engine=ZERO2)
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == \
        [expected.format("DeepSpeed ZeRO-2")], result.stderr[-3000:]
    assert "]: Traceback" not in result.stderr


def test_lora_under_fsdp_matches_ddp_and_resumes_exactly(assets, tmp_path, ddp):
    straight, resumed = straight_and_resumed(
        LORA, lambda out: base_args(assets, out, checkpointing_steps=2, **LORA_FLAGS), tmp_path, num_processes=2,
        engine=FSDP, after=("checkpoint-3", "pytorch_lora_weights.safetensors"))
    assert os.path.isfile(os.path.join(straight, "validation", "step-000003.png"))
    lora = {out: load_file(os.path.join(out, "pytorch_lora_weights.safetensors")) for out in (straight, resumed)}
    assert max_diff(lora[straight], lora[resumed]) == 0
    assert max_diff(lora[straight], load_file(os.path.join(ddp["lora"], "pytorch_lora_weights.safetensors"))) < 1e-6


def test_lora_ema_under_fsdp_and_lora_under_zero3_are_refused_before_loading(assets, tmp_path, zero3):
    cases = [(FSDP, dict(ema_decay=0.9), "error: --ema_decay > 0 does not work under FSDP for LoRA: the EMA adapters "
              "cannot stand in for sharded ones in a forward pass; use --ema_decay 0 (LCM-LoRA's own choice) or DDP "
              "(configs/accelerate_multi_gpu.yaml)"),
             (zero3, {}, "error: DeepSpeed ZeRO-3 is for full distillation (train_lcm_distill.py): LCM-LoRA trains a "
              "few MB of adapters on a frozen base; use configs/accelerate_deepspeed_zero2.yaml, or "
              "configs/accelerate_fsdp.yaml to shard the base")]
    for i, (engine, flags, expected) in enumerate(cases):
        out = str(tmp_path / f"run{i}")
        result = launch(LORA, base_args(assets, out, **flags, **LORA_FLAGS), num_processes=2, engine=engine)
        assert result.returncode != 0
        assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [expected], \
            result.stderr[-3000:]
        assert "]: Traceback" not in result.stderr  # no rank crashed (the launcher adds its own report)
        assert not os.path.exists(os.path.join(out, "checkpoint-3"))


def test_full_distillation_under_zero2_matches_ddp_and_resumes_exactly(assets, tmp_path, ddp):
    straight = check_full_run(ZERO2, assets, tmp_path, ddp, 1e-6)
    assert os.path.isdir(os.path.join(straight, "checkpoint-2", "deepspeed"))  # ZeRO's per-rank optimizer shards


def test_full_distillation_under_zero3_matches_ddp_and_resumes_exactly(assets, tmp_path, ddp, zero3):
    """Every weight of the student partitioned: the EMA update, the checkpoints and the export gather them."""
    check_full_run(zero3, assets, tmp_path, ddp, 5e-6)


def test_lora_under_zero2_matches_ddp(assets, tmp_path, ddp):
    """With gradient_accumulation_steps: 1 in the DeepSpeed config: the run's --gradient_accumulation_steps 2
    wins (accelerate alone would keep the config's and only warn), so the result is DDP's with 2."""
    import yaml

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), ZERO2)) as f:
        config = yaml.safe_load(f)
    config["deepspeed_config"]["gradient_accumulation_steps"] = 1
    engine = str(tmp_path / "zero2_accumulation_1.yaml")
    with open(engine, "w") as f:
        yaml.safe_dump(config, f)
    out = str(tmp_path / "zero2")
    check_ok(launch(LORA, base_args(assets, out, **LORA_FLAGS), num_processes=2, engine=engine))
    assert max_diff(load_file(os.path.join(out, "pytorch_lora_weights.safetensors")),
                    load_file(os.path.join(ddp["lora"], "pytorch_lora_weights.safetensors"))) < 1e-6


def test_non_finite_losses_under_zero2_leave_the_weights_alone(assets, tmp_path):
    """DeepSpeed steps inside the backward pass: its own overflow check skips the update (fp32 with clipping,
    fp16 and bf16), the run counts and reports the skip as without DeepSpeed, and the EMA target waits too."""
    out = str(tmp_path / "run")
    result = launch(FULL, base_args(assets, out, max_train_steps=4, checkpointing_steps=1), num_processes=2,
                    engine=ZERO2, env={"ENGINE_TEST_NAN_CALLS": "1,2"})
    check_ok(result)
    assert "step 2: 1 non-finite loss, update skipped (1 in a row now)" in result.stdout
    assert "step 3: 1 non-finite loss, update skipped (2 in a row now)" in result.stdout
    for part in ("unet", "unet_target"):
        after = {n: unet_weights(os.path.join(out, f"checkpoint-{n}", part)) for n in (1, 3, 4)}
        assert max_diff(after[1], after[3]) == 0, part
        assert max_diff(after[3], after[4]) > 0, part


@pytest.mark.parametrize("engine, script", [(FSDP, FULL), (ZERO2, LORA), ("zero3", FULL)])
def test_bf16_under_each_engine_trains_and_exports_fp32_weights(assets, tmp_path, request, engine, script):
    """bf16 on CPU: FSDP computes in bf16 on fp32 shards; DeepSpeed keeps a bf16 copy in the module and the fp32
    masters in its optimizer, and the checkpoint and export take the masters, not the rounded copy."""
    config = request.getfixturevalue("zero3") if engine == "zero3" else engine
    out = str(tmp_path / "run")
    flags = LORA_FLAGS if script == LORA else COMMON
    result = launch(script, base_args(assets, out, mixed_precision="bf16", **flags), num_processes=2, engine=config)
    check_ok(result)
    assert "bf16 on cpu" in result.stdout
    if script == LORA:
        weights = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    else:
        weights = unet_weights(os.path.join(out, "unet"))
        assert {v.dtype for v in unet_weights(os.path.join(out, "checkpoint-2", "unet")).values()} == {torch.float32}
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values())
    # Trained fp32 weights: some are not bf16 numbers (a bf16 copy cast back to fp32 would be).
    assert any((v != v.to(torch.bfloat16).float()).any() for v in weights.values())
