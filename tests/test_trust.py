"""What a new user must be able to trust: a resume on another teacher is refused before anything loads (unless
asked for), and what the data loses is said on the console."""

import os
import shutil

import pytest

from conftest import base_args, copy_with_altered_weights
from lcm_utils import checkpoint as ckpt
from test_cli import with_flags
from test_interrupts import run_in_process


def refused(argv, capsys, monkeypatch):
    """The one error line of a run that must stop before any model loads (status 2)."""
    import lcm_utils.training.setup as setup

    monkeypatch.setattr(setup, "load_teacher", lambda *a, **k: pytest.fail("a model was loaded"))
    return only_error(argv, capsys)


def only_error(argv, capsys):
    """The error line of a run that stops in its checks; nothing at all on stdout."""
    with pytest.raises(SystemExit) as info:
        run_in_process(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out.strip() == "" and err.startswith("error: ") and "\n" not in err.strip(), (out, err)
    return err.strip()


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """A run of 1 step on the epsilon teacher, with its checkpoint; returns (output_dir, argv)."""
    out = str(tmp_path_factory.mktemp("trained") / "out")
    argv = base_args(assets, out, max_train_steps=1, checkpointing_steps=1)
    assert run_in_process(argv) == 0
    return out, argv


def resume_argv(argv, teacher, *extra):
    return with_flags(argv, pretrained_teacher_model=teacher, max_train_steps=2,
                      resume_from_checkpoint="latest") + list(extra)


def test_a_checkpoint_records_its_teacher(trained, assets):
    out, _ = trained
    recorded = ckpt.read_json(os.path.join(out, "checkpoint-1", ckpt.STATE_FILE))["teacher"]
    assert recorded["teacher"] == os.path.abspath(assets["teacher_eps"])
    assert recorded["family"] == "SD 1.x/2.x" and recorded["prediction_type"] == "epsilon"
    assert len(recorded["weights"]) == 16 and len(recorded["denoiser_config"]) == 16


@pytest.mark.parametrize("other, expected", [
    ("teacher_v", "predicts v_prediction, not epsilon"),
    ("altered", "has other denoiser weights"),
    ("sdxl", "(SD 1.x/2.x); this run's --pretrained_teacher_model"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_resume_on_another_teacher_is_refused_before_loading(trained, assets, sdxl_assets, tmp_path, capsys,
                                                               monkeypatch, other, expected, dry_run):
    out, argv = trained
    teacher = {"teacher_v": assets["teacher_v"], "sdxl": sdxl_assets["sdxl"]}.get(other) or \
        copy_with_altered_weights(assets["teacher_eps"], str(tmp_path / "altered"), "unet")
    err = refused(resume_argv(argv, teacher, *(["--dry_run"] if dry_run else [])), capsys, monkeypatch)
    assert f"error: --resume_from_checkpoint: '{os.path.join(out, 'checkpoint-1')}' was trained against" in err, err
    assert expected in err, err
    if other == "sdxl":  # no flag makes another family fit
        assert "is SDXL: a student cannot change family" in err, err
        err = refused(resume_argv(argv, teacher, "--allow_teacher_change"), capsys, monkeypatch)
        assert "cannot change family" in err
    else:
        assert err.endswith("or pass --allow_teacher_change if continuing on this teacher is intended"), err


def continued_in_a_copy(trained, tmp_path):
    """The fixture's run copied to a new folder (the fixture's own checkpoint stays as it is for the other tests)."""
    out, argv = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    return copy, [copy if a == out else a for a in argv]


def test_allow_teacher_change_continues_on_a_fine_tune_and_records_it(trained, assets, tmp_path):
    copy, argv = continued_in_a_copy(trained, tmp_path)
    fine_tune = copy_with_altered_weights(assets["teacher_eps"], str(tmp_path / "fine_tune"), "unet")
    assert run_in_process(resume_argv(argv, fine_tune, "--allow_teacher_change")) == 0
    first = ckpt.read_json(os.path.join(copy, "checkpoint-1", ckpt.STATE_FILE))["teacher"]
    second = ckpt.read_json(os.path.join(copy, "checkpoint-2", ckpt.STATE_FILE))["teacher"]
    assert second["teacher"] == fine_tune and second["weights"] != first["weights"]
    assert second["denoiser_config"] == first["denoiser_config"]


def test_the_same_teacher_resumes_without_a_word(trained, assets, tmp_path, capsys):
    copy, argv = continued_in_a_copy(trained, tmp_path)
    assert run_in_process(resume_argv(argv, assets["teacher_eps"])) == 0
    out = capsys.readouterr()
    assert "resumed from" in out.out and "teacher" not in out.err


def folder_with_bad_samples(images, out_dir):
    """The 12 test images with .txt captions: 2 unreadable images, 1 without a caption, 1 latin-1 caption (kept)."""
    import json

    shutil.copytree(images, out_dir)
    with open(os.path.join(out_dir, "metadata.jsonl")) as f:
        records = [json.loads(line) for line in f]
    os.remove(os.path.join(out_dir, "metadata.jsonl"))
    for record in records:
        stem = os.path.splitext(record["file_name"])[0]
        with open(os.path.join(out_dir, stem + ".txt"), "wb") as f:
            f.write(record["text"].encode())
    names = [r["file_name"] for r in records]
    for name in names[:2]:
        with open(os.path.join(out_dir, name), "r+b") as f:
            f.truncate(60)
    os.remove(os.path.join(out_dir, os.path.splitext(names[2])[0] + ".txt"))
    with open(os.path.join(out_dir, os.path.splitext(names[3])[0] + ".txt"), "wb") as f:
        f.write("a caf\u00e9 square".encode("latin-1"))
    return out_dir


def test_broken_filtered_and_repaired_samples_are_said_on_the_console(assets, tmp_path, capsys):
    import re

    data = folder_with_bad_samples(assets["images"], str(tmp_path / "data"))
    # 9 usable images, batch 2: step 6 reads into epoch 1, so every sample of epoch 0 was read by then.
    argv = base_args(assets, str(tmp_path / "out"), train_data_dir=data, max_train_steps=6, logging_steps=1)
    assert run_in_process(argv) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("data: ") and "samples read" in line]
    assert len(lines) >= 2, out  # at the first look, and at the end
    last = re.fullmatch(r"data: (\d+) broken \(bad_image (\d+), missing_caption (\d+)\), (\d+) repaired "
                        r"\(caption_reencoded (\d+)\); (\d+) of (\d+) samples read were dropped \(([\d.]+)%\)",
                        lines[-1])
    assert last, lines[-1]
    broken, bad_image, missing, repaired, reencoded, dropped, read, share = map(float, last.groups())
    assert bad_image >= 2 and missing >= 1 and reencoded >= 1 and repaired == reencoded
    assert broken == bad_image + missing == dropped  # a repaired caption is kept: not dropped
    assert read == dropped + 6 * 2 and abs(share - 100 * dropped / read) < 0.06
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "of the samples read were dropped (more than 5%): check the data" in warnings[0]


def test_a_clean_run_says_nothing_about_the_data(assets, tmp_path, capsys):
    assert run_in_process(base_args(assets, str(tmp_path / "out"), max_train_steps=2)) == 0
    out = capsys.readouterr().out
    assert "samples read" not in out and "warning" not in out


def test_the_data_line_separates_filtered_from_broken_and_repaired():
    from lcm_utils.data import data_report

    line, share, filters = data_report({"filtered_min_original_size": 218, "bad_image": 6, "caption_reencoded": 2,
                                        "truncated_shard": 2}, used=4)
    assert line == ("data: 8 broken (bad_image 6, truncated_shard 2), 218 filtered (--min_original_size 218), "
                    "2 repaired (caption_reencoded 2); 226 of 230 samples read were dropped (98.3%)")
    assert abs(share - 226 / 230) < 1e-12 and filters == ["--min_original_size"]
    from lcm_utils.data import tracker_name

    assert tracker_name("caption_reencoded") == "data/repaired_caption_reencoded"  # kept: not under skipped
    assert tracker_name("bad_image") == "data/skipped_bad_image"


def test_a_dry_run_that_fails_prints_only_its_error(assets, tmp_path, capsys):
    data = folder_with_bad_samples(assets["images"], str(tmp_path / "data"))
    for name in os.listdir(data):  # every image unreadable: the first batch cannot be made
        if name.endswith(".png"):
            with open(os.path.join(data, name), "r+b") as f:
                f.truncate(60)
    err = only_error(base_args(assets, str(tmp_path / "out"), train_data_dir=data, dry_run=True), capsys)
    assert "no usable samples" in err


def test_a_dry_run_that_passes_prints_the_config_then_the_batch(assets, tmp_path, capsys):
    assert run_in_process(base_args(assets, str(tmp_path / "out"), dry_run=True)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("dry run OK") and out[-2].startswith("first batch: pixel_values (2, 3, 16, 16)")


def test_a_resolution_below_what_the_teacher_samples_is_refused(tmp_path, assets, capsys):
    from lcm_utils.tiny import build_tiny_teacher

    deep = build_tiny_teacher(str(tmp_path / "deep"), unet_channels=(32, 32, 32, 32))  # 3 downsamplings
    err = only_error(base_args({**assets, "deep": deep}, str(tmp_path / "out"), teacher="deep", resolution=8), capsys)
    assert err == ("error: --resolution (8) is below the 16 px that the teacher's SD 1.x/2.x denoiser can sample "
                   "(a 8x8 latent, one pixel after its downsamplings); use at least 16")


def test_an_unreachable_hub_is_said_in_one_line_at_once(assets, tmp_path, capsys, monkeypatch):
    import time

    from huggingface_hub import constants

    from lcm_utils.families import registry

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(registry, "_HUB_REACHABLE", {})
    start = time.monotonic()
    err = only_error(base_args({**assets, "hub": "someone/some-teacher"}, str(tmp_path / "out"), teacher="hub",
                               dry_run=True), capsys)
    assert time.monotonic() - start < 10
    assert err == ("error: --pretrained_teacher_model: 'someone/some-teacher' is a Hub id and the Hub "
                   "(http://127.0.0.1:9) cannot be reached from here; download it where there is network (hf download "
                   "someone/some-teacher --local-dir DIR) and pass DIR, or set HF_HUB_OFFLINE=1 to use a copy in the "
                   "Hugging Face cache")


def test_the_start_summary_names_the_vae_and_its_dtype(assets, tmp_path, capsys):
    assert run_in_process(base_args(assets, str(tmp_path / "out"), max_train_steps=1)) == 0
    out = capsys.readouterr().out
    assert "vae:       the teacher's vae/ (float32 on cpu, encodes every batch)" in out, out


def test_the_launch_path_is_read_from_the_launcher(tmp_path):
    """Under accelerate's single-process launcher a stop has 5 s; under torchrun TORCH_ELASTIC_SHUTDOWN_TIMEOUT;
    started with python, no launcher limit."""
    import subprocess
    import sys

    from conftest import ROOT, script_env

    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\nfrom lcm_utils.safety import launch_path\n"
                     f"print('launch path:', *launch_path())\n")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {"accelerate launch 5.0": accelerate + [str(probe)], "python None": [sys.executable, str(probe)]}
    for expected, command in runs.items():
        result = subprocess.run(command, capture_output=True, text=True, env=script_env(), timeout=120)
        assert f"launch path: {expected}" in result.stdout, result.stdout + result.stderr
    env = script_env({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(probe)]
    result = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=120)
    assert "launch path: torchrun 120.0" in result.stdout, result.stdout + result.stderr


def test_a_checkpoint_too_slow_for_the_launcher_is_warned_about():
    from lcm_utils.safety import stop_grace_warning

    sd15_full = 4 * 4 * 859_520_964  # student, EMA target and AdamW's two moments of SD 1.5's UNet, fp32
    start = stop_grace_warning("accelerate launch", 5.0, sd15_full)
    assert start.startswith("warning: this run's checkpoint is about 13.8 GB (about 28 s to write at 0.5 GB/s) and "
                            "accelerate launch gives a stop 5 s before it kills the run"), start
    assert "`python train_*.py ...`" in start
    timed = stop_grace_warning("torchrun", 30.0, sd15_full, save_s=41.0)
    assert "took 41.0 s to write" in timed and "raise TORCH_ELASTIC_SHUTDOWN_TIMEOUT (now 30) to at least 92" in timed
    assert stop_grace_warning("torchrun", 30.0, sd15_full, save_s=12.0) is None  # it fits
    assert stop_grace_warning("python", None, sd15_full) is None  # no launcher limit
    assert stop_grace_warning("accelerate launch", 5.0, 4 * 4 * 3_000_000) is None  # a LoRA-sized state
