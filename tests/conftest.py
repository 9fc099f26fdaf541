"""Session fixtures: tiny teachers and toy datasets built in code (offline), and a launcher for the scripts."""

import os
import shutil
import subprocess
import sys

import pytest

from lcm_utils.tiny import (build_image_folder, build_tiny_sd3_teacher, build_tiny_sdxl_teacher, build_tiny_teacher,
                            build_wds_shards)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 16  # tiny VAE factor 2 -> 8x8 latents, the tiny UNet's sample_size


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("assets")
    return {
        "teacher_eps": build_tiny_teacher(str(base / "teacher_eps"), "epsilon", seed=0),
        "teacher_v": build_tiny_teacher(str(base / "teacher_v"), "v_prediction", seed=1),
        "images": build_image_folder(str(base / "images"), num_images=12, size=RESOLUTION + 4),
        "shards": build_wds_shards(str(base / "shards"), num_shards=2, per_shard=6, size=RESOLUTION + 4),
    }


@pytest.fixture(scope="session")
def sdxl_assets(tmp_path_factory):
    """Tiny SDXL teachers (unconditional branch zeros, as SDXL base; and encoded "") and LAION-style shards."""
    base = tmp_path_factory.mktemp("sdxl_assets")
    return {
        "sdxl": build_tiny_sdxl_teacher(str(base / "sdxl"), seed=2),
        "sdxl_encoded_uncond": build_tiny_sdxl_teacher(str(base / "sdxl_enc"), seed=3,
                                                       force_zeros_for_empty_prompt=False),
        "shards_json": build_wds_shards(str(base / "shards_json"), num_shards=2, per_shard=6, size=RESOLUTION + 8,
                                        with_json=True),
    }


@pytest.fixture(scope="session")
def sd3_assets(tmp_path_factory):
    """Tiny SD3 teachers: with T5 (SD3 Medium's layout), and without T5 with dual attention (SD3.5 Medium's
    blocks, loaded as users load a T5-less folder); toy images and shards."""
    base = tmp_path_factory.mktemp("sd3_assets")
    return {
        "sd3": build_tiny_sd3_teacher(str(base / "sd3"), seed=4),
        "sd3_no_t5": build_tiny_sd3_teacher(str(base / "sd3_no_t5"), seed=5, with_t5=False, dual_attention=True),
        "images": build_image_folder(str(base / "images"), num_images=12, size=RESOLUTION + 4),
        "shards": build_wds_shards(str(base / "shards"), num_shards=2, per_shard=6, size=RESOLUTION + 4),
    }


def script_env(env=None):
    """The environment the scripts run in under the tests: offline, one thread, CPU."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                    ACCELERATE_USE_CPU="1")
    full_env.update(env or {})
    return full_env


def launch_command(script, args, num_processes=1, quiet=False, engine=None):
    mode = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    target = [os.path.join(ROOT, script)]
    if engine:  # an accelerate config for FSDP or DeepSpeed, run on CPU through tests/engine_on_cpu.py
        mode = ["--config_file", engine if os.path.isabs(engine) else os.path.join(ROOT, engine)]
        target.insert(0, os.path.join(ROOT, "tests", "engine_on_cpu.py"))
    if quiet:  # as scripts/demo.sh launches: only the script's own error line on a failure
        mode += ["-q", "--num_cpu_threads_per_process", "1"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *target, *map(str, args)]


def engine_type(config_file):
    import yaml

    with open(config_file if os.path.isabs(config_file) else os.path.join(ROOT, config_file)) as f:
        return yaml.safe_load(f)["distributed_type"]


def launch(script, args, num_processes=1, timeout=300, env=None, quiet=False, engine=None):
    """Run a training script through `accelerate launch` on CPU, as a user would; returns CompletedProcess.

    Several CPU processes need `--multi_gpu` with ACCELERATE_USE_CPU=1: `--cpu --num_processes 2` silently
    starts a single process (accelerate 1.x's simple launcher). engine: an accelerate config file (FSDP or
    DeepSpeed; see tests/engine_on_cpu.py)."""
    full_env = script_env(env)
    if engine and engine_type(engine) == "DEEPSPEED":  # DeepSpeed's own CPU accelerator, not accelerate's CPU mode
        del full_env["ACCELERATE_USE_CPU"]
    return subprocess.run(launch_command(script, args, num_processes, quiet, engine), cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def base_args(assets, out_dir, teacher="teacher_eps", **overrides):
    """Flags for a few-step CPU run on the tiny teacher."""
    flags = dict(pretrained_teacher_model=assets[teacher], train_data_dir=assets.get("images"), output_dir=out_dir,
                 resolution=RESOLUTION, train_batch_size=2, max_train_steps=3, learning_rate=1e-3,
                 lr_warmup_steps=0, checkpointing_steps=1000, validation_steps=1000, seed=0,
                 validation_inference_steps="1 2", report_to="none", num_ddim_timesteps=50,
                 validation_prompts="a red square")
    flags.update(overrides)
    out = []
    for key, value in flags.items():
        if value is None:
            continue
        if value is True:
            out.append(f"--{key}")
        elif value is not False:
            out.append(f"--{key}")
            out.extend(str(value).split(" ") if key in ("validation_inference_steps",) else [str(value)])
    return out


def check_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def straight_and_resumed(script, make_args, tmp_path, num_processes=1, after=("checkpoint-4",), engine=None):
    """Run one command twice; in the second folder delete what came after checkpoint-2 (as if the run had been
    killed there) and rerun it with `--resume_from_checkpoint latest`. Returns (straight, resumed) folders."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for out in (straight, resumed):
        check_ok(launch(script, make_args(out), num_processes, engine=engine))
    for later in after:
        path = os.path.join(resumed, later)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.remove(os.path.join(resumed, "exported.json"))  # a run killed after checkpoint-2 exported nothing
    result = launch(script, make_args(resumed) + ["--resume_from_checkpoint", "latest"], num_processes, engine=engine)
    check_ok(result)
    assert f"resumed from {os.path.join(resumed, 'checkpoint-2')}" in result.stdout
    return straight, resumed


def copy_with_altered_weights(teacher, out_dir, *parts):
    """A copy of a teacher folder whose `parts` (e.g. 'unet', 'vae', 'text_encoder') have other weights of the same
    shapes and configs: one tensor of each is shifted, as a fine-tune would change it."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(teacher, out_dir)
    for part in parts:
        folder = os.path.join(out_dir, part)
        name = next(n for n in sorted(os.listdir(folder)) if n.endswith(".safetensors"))
        tensors = load_file(os.path.join(folder, name))
        first = sorted(tensors)[0]
        tensors[first] = tensors[first] + 0.01
        save_file(tensors, os.path.join(folder, name))
    return out_dir
