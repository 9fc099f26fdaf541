"""Precomputed latent shards (lcm_utils.precompute): training from them equals encoding on the fly step for step,
resumes exactly, survives a killed precompute, runs on two processes, and refuses shards of another setup."""

import hashlib
import json
import os
import shutil

import pytest
import torch

from conftest import (RESOLUTION, ROOT, base_args, check_ok, copy_with_altered_weights, launch, script_env,
                      straight_and_resumed)
from lcm_utils import precompute

SHARDS = "{00000..00001}.tar"


def run_precompute(argv):
    from accelerate.state import PartialState

    try:
        return precompute.main(argv)
    finally:
        PartialState._reset_state()


def precompute_args(teacher, out, **overrides):
    flags = dict(pretrained_teacher_model=teacher, resolution=RESOLUTION, center_crop=True, output_dir=out,
                 storage_dtype="fp32", vae_encode_batch_size=4)
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def latent_pattern(out, count=2):
    return os.path.join(out, "latents-{%06d..%06d}.tar" % (0, count - 1))


@pytest.fixture(scope="module")
def latent_shards(assets, tmp_path_factory):
    """The test shards precomputed in fp32 with the tiny SD teacher (center crop: deterministic)."""
    out = str(tmp_path_factory.mktemp("latents"))
    assert run_precompute(precompute_args(assets["teacher_eps"], out, train_shards_path_or_url=assets["shards"])) == 0
    return latent_pattern(out)


def losses_and_inputs(argv):
    """Run the full script in process; per step (z0, cond, uncond, w) as the consistency pair got them, and its L2."""
    from accelerate.state import AcceleratorState

    import lcm_utils.training.loop as training
    from lcm_utils.training import main
    from train_lcm_distill import FullDistillation

    real, seen = training.consistency_pair, []

    def spy(z0, cond, uncond, w, *rest, **kwargs):
        pair = real(z0, cond, uncond, w, *rest, **kwargs)
        loss = training.LOSSES["l2"](pair.pred.float(), pair.target.float(), None)
        seen.append((z0.clone(), cond, uncond, w.clone(), loss.item()))
        return pair

    training.consistency_pair = spy
    try:
        assert main(FullDistillation, "test", argv) == 0
    finally:
        training.consistency_pair = real
        AcceleratorState._reset_state(True)
    return seen


def flat(cond):
    """A (nested) condition dict as {name: tensor}."""
    out = {}
    for key, value in cond.items():
        out.update({f"{key}.{k}": v for k, v in flat(value).items()} if isinstance(value, dict) else {key: value})
    return out


def assert_same_steps(on_the_fly, precomputed):
    assert len(on_the_fly) == len(precomputed) > 0
    for (z0, cond, uncond, w, loss), (z0_p, cond_p, uncond_p, w_p, loss_p) in zip(on_the_fly, precomputed):
        torch.testing.assert_close(z0_p, z0, rtol=1e-5, atol=1e-6)
        for a, b in ((cond, cond_p), (uncond, uncond_p)):
            a, b = flat(a), flat(b)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(b[key].expand_as(a[key]), a[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(w, w_p)
        # Same inputs; the VAE hands its latents over channels-last, the shards contiguous: float-level differences.
        assert loss_p == pytest.approx(loss, rel=1e-4)


def test_training_from_precomputed_shards_equals_encoding_on_the_fly(assets, latent_shards, tmp_path):
    """Same seed, same shard order and shuffle: the same latents (the same posterior draw), the same text
    conditions, the same prompts dropped, the same losses, step for step."""
    common = dict(train_data_dir=None, max_train_steps=4, center_crop=True, shuffle_buffer_size=4,
                  proportion_empty_prompts=0.5)
    on_the_fly = losses_and_inputs(base_args(assets, str(tmp_path / "a"), train_shards_path_or_url=assets["shards"],
                                             **common))
    precomputed = losses_and_inputs(base_args(assets, str(tmp_path / "b"), train_shards_path_or_url=latent_shards,
                                              **common))
    assert_same_steps(on_the_fly, precomputed)
    # The dropped prompts really were dropped (conditioned as the unconditional branch) in both.
    dropped = [(flat(c)["encoder_hidden_states"] - flat(u)["encoder_hidden_states"]).abs().amax(dim=(1, 2)) == 0
               for _, c, u, _, _ in precomputed]
    assert 0 < int(torch.cat(dropped).sum()) < 8


def test_sdxl_from_precomputed_shards_equals_encoding_on_the_fly(sdxl_assets, tmp_path):
    """Pooled embeddings and time ids (original size from the LAION json, the crop) come through the shards."""
    out = str(tmp_path / "latents")
    assert run_precompute(precompute_args(sdxl_assets["sdxl"], out, center_crop=False, random_flip=True,
                                          train_shards_path_or_url=sdxl_assets["shards_json"])) == 0
    assert "latents-000001.tar" in os.listdir(out)
    teacher = {"teacher": sdxl_assets["sdxl"]}
    common = dict(train_data_dir=None, max_train_steps=3, shuffle_buffer_size=4, proportion_empty_prompts=0.3)
    precomputed = losses_and_inputs(base_args(teacher, str(tmp_path / "b"), teacher="teacher",
                                              train_shards_path_or_url=latent_pattern(out), **common))
    # On the fly with the precompute's crops is not possible (its crops were drawn with its own seeds): the time
    # ids must still be those of real crops of the stored original sizes.
    for _, cond, _, _, _ in precomputed:
        time_ids = cond["added_cond_kwargs"]["time_ids"]
        assert time_ids.shape[1] == 6 and (time_ids[:, 4:] == RESOLUTION).all()
        assert (time_ids[:, :2] >= 100).all()  # LAION original sizes, not the 24 px of the stored images
    out_fixed = str(tmp_path / "fixed")
    assert run_precompute(precompute_args(sdxl_assets["sdxl"], out_fixed,
                                          train_shards_path_or_url=sdxl_assets["shards_json"])) == 0
    common.update(center_crop=True)
    on_the_fly = losses_and_inputs(base_args(teacher, str(tmp_path / "c"), teacher="teacher",
                                             train_shards_path_or_url=sdxl_assets["shards_json"], **common))
    precomputed = losses_and_inputs(base_args(teacher, str(tmp_path / "d"), teacher="teacher",
                                              train_shards_path_or_url=latent_pattern(out_fixed), **common))
    assert_same_steps(on_the_fly, precomputed)


def test_precomputed_stream_resumes_exactly_with_the_lora_script(assets, latent_shards, tmp_path):
    from safetensors.torch import load_file

    common = dict(train_data_dir=None, train_shards_path_or_url=latent_shards, shuffle_buffer_size=3,
                  max_train_steps=4, checkpointing_steps=2, dataloader_num_workers=2, lora_rank=4)
    straight, resumed = straight_and_resumed("train_lcm_lora.py", lambda out: base_args(assets, out, **common),
                                             tmp_path, after=("checkpoint-4", "pytorch_lora_weights.safetensors"))
    a = load_file(os.path.join(straight, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def file_digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_a_killed_precompute_keeps_finished_shards_and_writes_only_the_rest(assets, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "latents")
    argv = precompute_args(assets["teacher_eps"], out, train_data_dir=assets["images"], samples_per_shard=5)
    real_write, written = precompute.write_unit, []

    def dies_on_the_second_shard(path, *args):
        if written:  # the second shard: killed half-way, its partial file left behind
            open(path + precompute.PARTIAL_SUFFIX, "wb").write(b"half a tar")
            raise KeyboardInterrupt
        written.append(path)
        return real_write(path, *args)

    monkeypatch.setattr(precompute, "write_unit", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(argv)
    assert sorted(os.listdir(out)) == ["latents-000000.tar", "latents-000001.tar.partial", "precompute.json"]
    first = file_digest(os.path.join(out, "latents-000000.tar"))
    capsys.readouterr()

    encoded = []
    real_encode = precompute.encode_batch
    monkeypatch.setattr(precompute, "write_unit", real_write)
    monkeypatch.setattr(precompute, "encode_batch", lambda family, vae, examples, dtype: (
        encoded.extend(e["key"] for e in examples), real_encode(family, vae, examples, dtype))[1])
    assert run_precompute(argv) == 0
    text = capsys.readouterr().out
    assert "1 shard(s) of this process were finished before: kept" in text
    assert "wrote 2 shard(s) (7 samples; skipped none), kept 1 finished before" in text
    assert f"--train_shards_path_or_url '{os.path.join(out, 'latents-{000000..000002}.tar')}'" in text
    assert sorted(encoded) == [f"{i:08d}-0" for i in range(5, 12)]  # images 0-4 were not encoded again
    assert file_digest(os.path.join(out, "latents-000000.tar")) == first
    assert sorted(os.listdir(out)) == ["latents-000000.tar", "latents-000001.tar", "latents-000002.tar",
                                       "precompute.json"]

    # Other settings into the same folder: refused, nothing written.
    with pytest.raises(SystemExit) as info:
        run_precompute(precompute_args(assets["teacher_eps"], out, train_data_dir=assets["images"],
                                       samples_per_shard=5, center_crop=False))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir: '{out}' holds shards precomputed with other settings (header); use a new "
        f"--output_dir or delete that one")


def test_bad_samples_are_skipped_and_counted(assets, tmp_path, capsys):
    images = str(tmp_path / "images")
    shutil.copytree(assets["images"], images)
    names = sorted(n for n in os.listdir(images) if not n.endswith((".jsonl", ".txt")))
    open(os.path.join(images, names[0]), "wb").write(b"not an image")
    assert run_precompute(precompute_args(assets["teacher_eps"], str(tmp_path / "out"), train_data_dir=images,
                                          crops_per_image=2)) == 0
    assert "(22 samples; skipped bad_image: 1)" in capsys.readouterr().out


def test_two_processes_write_disjoint_shards_and_train(assets, tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "latents")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
               "lcm_utils.precompute"] + precompute_args(assets["teacher_eps"], out, train_data_dir=assets["images"],
                                                         samples_per_shard=3)
    result = subprocess.run(command, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    check_ok(result)
    assert result.stdout.count("train with:") == 1
    assert "wrote 4 shard(s) (12 samples; skipped none)" in result.stdout
    check_ok(launch("train_lcm_distill.py", base_args(assets, str(tmp_path / "run"), train_data_dir=None,
                                                      train_shards_path_or_url=latent_pattern(out, 4)),
                    num_processes=2))


@pytest.mark.parametrize("change, expected", [
    (dict(resolution=2 * RESOLUTION), "hold latents of 16 px images, this run has --resolution 32"),
    (dict(teacher="sdxl"), "hold SD 1.x/2.x text embeddings, but the teacher"),
    (dict(vae="scaled"), "whose config differs from this run's"),
    (dict(altered="vae"), "whose weights differ from this run's (same config, other weights)"),
    (dict(altered="text_encoder"), "(same configs, other weights); precompute with this teacher"),
])
def test_mismatched_shards_are_refused_before_any_model_loads(assets, sdxl_assets, latent_shards, tmp_path,
                                                             monkeypatch, capsys, change, expected):
    import lcm_utils.training.setup as training

    monkeypatch.setattr(training, "load_teacher", lambda *a, **k: pytest.fail("a model was loaded"))
    flags = dict(train_data_dir=None, train_shards_path_or_url=latent_shards)
    if "resolution" in change:
        flags["resolution"] = change["resolution"]
    teachers = {"teacher": sdxl_assets["sdxl"] if change.get("teacher") else assets["teacher_eps"]}
    if change.get("altered"):  # the same configs, other weights: only a fingerprint of the weights tells
        teachers["teacher"] = copy_with_altered_weights(assets["teacher_eps"], str(tmp_path / "copy"), change["altered"])
    if change.get("vae"):
        vae = str(tmp_path / "vae")
        shutil.copytree(os.path.join(assets["teacher_eps"], "vae"), vae)
        config = json.load(open(os.path.join(vae, "config.json")))
        json.dump(dict(config, scaling_factor=0.5), open(os.path.join(vae, "config.json"), "w"))
        flags["pretrained_vae_model_name_or_path"] = vae
    from test_interrupts import run_in_process

    for dry_run in (True, False):
        with pytest.raises(SystemExit) as info:
            run_in_process(base_args(teachers, str(tmp_path / "out"), teacher="teacher", dry_run=dry_run, **flags))
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --train_shards_path_or_url: the precomputed") and expected in err, err
        assert len(err.splitlines()) == 1


def test_dry_run_describes_precomputed_shards(assets, latent_shards, tmp_path):
    result = launch("train_lcm_distill.py", base_args(assets, str(tmp_path / "out"), train_data_dir=None,
                                                      train_shards_path_or_url=latent_shards, dry_run=True,
                                                      random_flip=True))
    check_ok(result)
    assert f"first batch: latent_mean (2, 4, {RESOLUTION // 2}, {RESOLUTION // 2})" in result.stdout
    assert "note: --random_flip True has no effect: the precomputed shards were cropped with random_flip False" \
        in result.stdout


def test_precompute_flags_fail_in_one_line(assets, tmp_path):
    import subprocess
    import sys

    cases = [(["--output_dir", str(tmp_path)], "error: --pretrained_teacher_model is required"),
             (precompute_args(assets["teacher_eps"], str(tmp_path), train_data_dir=assets["images"],
                              crops_per_image=0), "error: --crops_per_image must be a positive integer, got 0"),
             (precompute_args(assets["teacher_eps"], str(tmp_path), train_data_dir=assets["images"],
                              proportion_empty_prompts=0.5), "error: unrecognized arguments: --proportion_empty_prompts")]
    for argv, expected in cases:
        result = subprocess.run([sys.executable, "-m", "lcm_utils.precompute", *argv], cwd=ROOT, env=script_env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.strip().startswith(expected), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
