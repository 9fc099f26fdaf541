"""Never lose work: stop signals, the last step's checkpoint, exports that are never replaced by older weights,
non-finite losses, and precision refused where it cannot work."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, base_args, check_ok, launch, launch_command, script_env

SCRIPT = "train_lcm_distill.py"
STEPS = 60  # long enough (several seconds) for a signal to land mid-run


def weights(folder, sub="unet"):
    return load_file(os.path.join(folder, sub, "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a, b):
    for sub in ("unet", "unet_target"):
        wa, wb = weights(a, sub), weights(b, sub)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), sub


def run_args(assets, out, **overrides):
    flags = dict(max_train_steps=STEPS, checkpointing_steps=2, checkpoints_total_limit=2, lr_scheduler="linear",
                 lr_warmup_steps=3)
    flags.update(overrides)
    return base_args(assets, out, **flags)


def start(args, num_processes=1):
    """Start a run through `accelerate launch`; its output goes to a log file (returned with the process)."""
    log = open(os.path.join(args[args.index("--output_dir") + 1] + ".log"), "w+")
    process = subprocess.Popen(launch_command(SCRIPT, args, num_processes), cwd=ROOT, env=script_env(),
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    return process, log


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def training_processes(launcher):
    """The script's processes under the launcher, by local rank."""
    import psutil

    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if SCRIPT in " ".join(child.cmdline()):
                found[int(child.environ().get("LOCAL_RANK", 0))] = child.pid
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "out")
    check_ok(launch(SCRIPT, run_args(assets, out)))
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_and_the_resumed_run_equals_the_straight_one(assets, straight, tmp_path, sig):
    out = str(tmp_path / "out")
    args = run_args(assets, out)
    process, log = start(args)
    wait_for(lambda: os.path.isdir(os.path.join(out, "checkpoint-2")) and training_processes(process))
    os.kill(training_processes(process)[0], sig)
    process.wait(timeout=120)
    log.seek(0)
    text = log.read()
    name = signal.Signals(sig).name
    assert f"{name} received: finishing this step and writing a checkpoint" in text
    stopped_at = int(text.split("stopped at step ")[1].split()[0])
    assert 2 <= stopped_at < STEPS, text[-2000:]
    assert os.path.isfile(os.path.join(out, f"checkpoint-{stopped_at}", "trainer_state.json"))
    assert "--resume_from_checkpoint latest" in text.split("resume with: ")[1]
    assert f"exit status {128 + sig}" in text or process.returncode != 0  # the launcher reports the child's status
    assert not os.path.exists(os.path.join(out, "unet"))  # an interrupted run exports nothing

    result = launch(SCRIPT, args + ["--resume_from_checkpoint", "latest"])
    check_ok(result)
    assert f"resumed from {os.path.join(out, f'checkpoint-{stopped_at}')}" in result.stdout
    assert_same_weights(straight, out)


def test_the_exit_status_is_128_plus_the_signal(assets, tmp_path):
    """Run without the launcher (as accelerate's single-process launcher does): the script's own status."""
    out = str(tmp_path / "out")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPT), *run_args(assets, out)], cwd=ROOT,
                               env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: os.path.isdir(os.path.join(out, "checkpoint-2")))
    process.send_signal(signal.SIGUSR1)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "SIGUSR1 received" in line:
            break
    process.send_signal(signal.SIGUSR1)  # a launcher's copy of the same signal, at once: not a second request
    text = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGUSR1, text[-2000:]
    assert "SIGUSR1 received" in text and "stopped at step" in text and "while stopping" not in text


def test_a_second_signal_stops_at_once(assets, tmp_path):
    out = str(tmp_path / "out")
    # 32 micro-batches per optimizer step: the run is still finishing its step well after the first Ctrl-C.
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPT),
                                *run_args(assets, out, gradient_accumulation_steps=32)],
                               cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: os.path.isdir(os.path.join(out, "checkpoint-2")))
    process.send_signal(signal.SIGINT)
    lines = []
    for line in process.stdout:  # the handler has run once it has printed
        lines.append(line)
        if "SIGINT received" in line:
            break
    time.sleep(0.7)  # later than a launcher's copy of the first one: a person pressing Ctrl-C again
    process.send_signal(signal.SIGINT)
    text = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGINT
    assert "SIGINT again: stopping now without a new checkpoint" in text
    assert "Traceback" not in text
    assert all(name.startswith("checkpoint-") and not name.endswith(".partial") or not name.startswith("checkpoint-")
               for name in os.listdir(out) if os.path.isfile(os.path.join(out, name, "trainer_state.json")))


TWO_PROCESS_STEPS = 30


@pytest.fixture(scope="module")
def two_process_reference(assets, tmp_path_factory):
    """An uninterrupted 2-process run on one machine."""
    out = str(tmp_path_factory.mktemp("two_process") / "out")
    check_ok(launch(SCRIPT, run_args(assets, out, max_train_steps=TWO_PROCESS_STEPS), num_processes=2))
    return out


def test_a_signal_to_one_rank_stops_both_at_the_same_step(assets, two_process_reference, tmp_path):
    """Two processes: only rank 1 is signalled; the ranks agree and write one complete checkpoint of that step,
    and the resumed pair ends where an uninterrupted pair ends."""
    steps = TWO_PROCESS_STEPS
    out = str(tmp_path / "out")
    args = run_args(assets, out, max_train_steps=steps)
    process, log = start(args, num_processes=2)
    wait_for(lambda: os.path.isdir(os.path.join(out, "checkpoint-2")) and len(training_processes(process)) == 2)
    os.kill(training_processes(process)[1], signal.SIGTERM)
    process.wait(timeout=180)
    log.seek(0)
    text = log.read()
    stopped_at = int(text.split("stopped at step ")[1].split()[0])
    assert 2 <= stopped_at < steps, text[-2000:]
    folder = os.path.join(out, f"checkpoint-{stopped_at}")
    assert all(os.path.isfile(os.path.join(folder, f)) for f in ("trainer_state.json", "rank_0.json", "rank_1.json"))

    check_ok(launch(SCRIPT, args + ["--resume_from_checkpoint", "latest"], num_processes=2))
    assert_same_weights(two_process_reference, out)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_machines(args, log_prefix):
    """Two launchers on localhost as machines 0 and 1 (one CPU process each), as on two nodes of a cluster."""
    port, machines = free_port(), []
    for rank in (0, 1):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--rdzv_backend", "static", "--same_network",
                   "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, SCRIPT), *args]
        log = open(f"{log_prefix}-machine{rank}.log", "w+")
        machines.append((subprocess.Popen(command, cwd=ROOT, env=script_env(), stdout=log,
                                          stderr=subprocess.STDOUT, text=True), log))
    return machines


def test_two_machines_on_localhost_checkpoint_stop_and_resume(assets, two_process_reference, tmp_path):
    """Machines 0 and 1 (a launcher each) train together; SIGTERM to both launchers, as a cluster's scheduler
    sends it, stops them at one step with a checkpoint; relaunched, they end where one 2-process machine ends."""
    out = str(tmp_path / "out")
    args = [str(a) for a in run_args(assets, out, max_train_steps=TWO_PROCESS_STEPS)]
    machines = start_two_machines(args, str(tmp_path / "first"))
    wait_for(lambda: os.path.isdir(os.path.join(out, "checkpoint-2")))
    for process, _ in machines:
        process.send_signal(signal.SIGTERM)  # torchrun passes it on to its worker
    texts = []
    for process, log in machines:
        process.wait(timeout=180)
        log.seek(0)
        texts.append(log.read())
    stopped_at = int(texts[0].split("stopped at step ")[1].split()[0])
    assert 2 <= stopped_at < TWO_PROCESS_STEPS, texts[0][-2000:]
    folder = os.path.join(out, f"checkpoint-{stopped_at}")
    assert all(os.path.isfile(os.path.join(folder, f)) for f in ("trainer_state.json", "rank_0.json", "rank_1.json"))

    machines = start_two_machines(args + ["--resume_from_checkpoint", "latest"], str(tmp_path / "second"))
    for process, log in machines:
        assert process.wait(timeout=300) == 0, open(log.name).read()[-3000:]
    assert f"resumed from {folder}" in open(machines[0][1].name).read()
    assert_same_weights(two_process_reference, out)


# ----------------------------------------------------------------------------- the end of a run, in process


def run_in_process(argv, method=None):
    from accelerate.state import AcceleratorState

    from lcm_utils.training import main
    from train_lcm_distill import FullDistillation

    try:
        return main(method or FullDistillation, "test", argv)
    finally:
        AcceleratorState._reset_state(True)


def file_hashes(out):
    """sha256 of every exported file (not checkpoints, logs or the resolved config)."""
    found = {}
    for name in ("unet", "unet_target", "scheduler"):
        for file in sorted(os.listdir(os.path.join(out, name))):
            found[f"{name}/{file}"] = hashlib.sha256(open(os.path.join(out, name, file), "rb").read()).hexdigest()
    for file in ("README.md", "exported.json"):
        found[file] = hashlib.sha256(open(os.path.join(out, file), "rb").read()).hexdigest()
    return found


def test_the_last_step_is_checkpointed_extended_exactly_and_a_rerun_past_the_end_changes_nothing(assets, tmp_path,
                                                                                                capsys):
    out, reference = str(tmp_path / "out"), str(tmp_path / "reference")
    common = dict(checkpointing_steps=1000, lr_scheduler="constant", lr_warmup_steps=0)
    assert run_in_process(base_args(assets, out, max_train_steps=3, **common)) == 0
    assert os.path.isfile(os.path.join(out, "checkpoint-3", "trainer_state.json"))  # not a multiple of 1000
    exported = file_hashes(out)

    # The same command again (as a rerun of scripts/demo.sh is): nothing to train, the export untouched.
    capsys.readouterr()
    assert run_in_process(base_args(assets, out, max_train_steps=3, resume_from_checkpoint="latest", **common)) == 0
    text = capsys.readouterr().out
    assert "nothing to train" in text and "already holds this run's export of step 3" in text
    assert file_hashes(out) == exported

    # Extended: it continues from step 3, and ends where a straight 5-step run ends.
    assert run_in_process(base_args(assets, out, max_train_steps=5, resume_from_checkpoint="latest", **common)) == 0
    assert f"resumed from {os.path.join(out, 'checkpoint-3')}" in capsys.readouterr().out
    assert run_in_process(base_args(assets, reference, max_train_steps=5, **common)) == 0
    assert_same_weights(reference, out)

    # Resumed from the older checkpoint-3 with the old length: the step-5 export is newer and stays.
    exported = file_hashes(out)
    assert run_in_process(base_args(assets, out, max_train_steps=3, resume_from_checkpoint="checkpoint-3",
                                    **common)) == 0
    assert "already holds this run's export of step 5" in capsys.readouterr().out
    assert file_hashes(out) == exported


def poison_losses(monkeypatch, bad):
    """NaN losses on the consistency-loss calls listed in `bad` (counting from 0); returns the list of calls."""
    import lcm_utils.training.loop as training

    real_loss, calls = training.LOSSES["l2"], []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) - 1 in bad else loss

    monkeypatch.setitem(training.LOSSES, "l2", poisoned)
    return calls


def optimizer_steps(checkpoint):
    """Updates the optimizer really made (its step count) up to this checkpoint."""
    state = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)["state"]
    return int(state[0]["step"])


def test_non_finite_losses_skip_the_update_on_the_device(assets, tmp_path, monkeypatch, capsys):
    """Steps 2 and 3 get NaN losses: their updates are skipped (weights, optimizer state and EMA target as after
    step 1), the steps still count; the host learns of it at its next look (every step here: a checkpoint each)."""
    out = str(tmp_path / "out")
    calls = poison_losses(monkeypatch, {1, 2})
    assert run_in_process(base_args(assets, out, max_train_steps=4, checkpointing_steps=1)) == 0
    text = capsys.readouterr().out
    assert "step 2: 1 non-finite loss, update skipped (1 in a row now)" in text
    assert "step 3: 1 non-finite loss, update skipped (2 in a row now)" in text
    assert len(calls) == 4
    after_1, after_3 = (os.path.join(out, f"checkpoint-{n}") for n in (1, 3))
    assert_same_weights(after_1, after_3)
    assert [optimizer_steps(os.path.join(out, f"checkpoint-{n}")) for n in (1, 2, 3, 4)] == [1, 1, 1, 2]
    for sub in ("unet", "unet_target"):
        assert all(torch.isfinite(v).all() for v in weights(out, sub).values()), sub
        assert not all(torch.equal(a, b) for a, b in zip(weights(after_3, sub).values(),
                                                         weights(out, sub).values())), sub


def test_non_finite_losses_are_counted_at_the_next_look(assets, tmp_path, monkeypatch, capsys):
    """With no checkpoint or log step in between, the skips are decided on the device and reported at the end."""
    out = str(tmp_path / "out")
    poison_losses(monkeypatch, {1, 2})
    assert run_in_process(base_args(assets, out, max_train_steps=4, checkpointing_steps=1000,
                                    logging_steps=10)) == 0
    assert "steps 1-4: 2 non-finite losses, updates skipped (0 in a row now)" in capsys.readouterr().out
    assert optimizer_steps(os.path.join(out, "checkpoint-4")) == 2


@pytest.mark.parametrize("checkpointing_steps, kept", [(1, "checkpoint-4"), (1000, None)])
def test_too_many_non_finite_losses_stop_the_run_naming_the_step(assets, tmp_path, monkeypatch, capsys,
                                                                 checkpointing_steps, kept):
    """From step 3 on every loss is NaN; the third in a row (step 5) stops the run, found at once (a look each
    step) or at the end (no look before), and no checkpoint is written after it."""
    out = str(tmp_path / "out")
    poison_losses(monkeypatch, set(range(2, 100)))
    with pytest.raises(SystemExit) as info:
        run_in_process(base_args(assets, out, max_train_steps=10, checkpointing_steps=checkpointing_steps,
                                 max_nonfinite_steps=3))
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the loss was not finite for 3 steps in a row (step 5, --max_nonfinite_steps 3)")
    checkpoints = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    if kept:
        assert f"the last checkpoint, {os.path.join(out, kept)}, is kept" in err
        assert checkpoints == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    else:
        assert "no checkpoint was written" in err and checkpoints == []


def test_fp16_on_cpu_is_refused_before_loading(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_in_process(base_args(assets, str(tmp_path / "out"), mixed_precision="fp16"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --mixed_precision fp16 needs a GPU: on CPU, PyTorch autocasts to bf16 only, so use "
                   "--mixed_precision bf16 (or no)")


def test_bad_stop_signal_names_are_refused(assets, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_in_process(base_args(assets, str(tmp_path / "out"), stop_signals="SIGTERM,SIGKILL"))
    assert "--stop_signals: 'SIGKILL' is not a signal a process can catch" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train_lcm_distill.py", "train_lcm_lora.py"])
def test_half_precision_parts_without_autocast_match_dtypes(assets, sdxl_assets, tmp_path, monkeypatch, script):
    """Under DeepSpeed accelerate does not autocast: bf16 text encoders, a bf16 teacher and fp32 student/target
    (or a half-precision engine) must still meet inputs of their own dtype. Simulated on CPU by turning
    accelerate's autocast off, on the SDXL teacher (nested conditions, fp32 time ids)."""
    import contextlib

    import accelerate

    from lcm_utils.training import main
    from train_lcm_distill import FullDistillation
    from train_lcm_lora import LoraDistillation

    monkeypatch.setattr(accelerate.Accelerator, "autocast", lambda self, *a, **k: contextlib.nullcontext())
    out = str(tmp_path / "out")
    argv = base_args({"teacher": sdxl_assets["sdxl"]}, out, teacher="teacher", train_data_dir=assets["images"],
                     mixed_precision="bf16", cast_teacher_unet=True, max_train_steps=2, validation_steps=2)
    if script == "train_lcm_lora.py":
        argv += ["--lora_rank", "4"]
    from accelerate.state import AcceleratorState

    try:
        assert main(LoraDistillation if "lora" in script else FullDistillation, "test", argv) == 0
    finally:
        AcceleratorState._reset_state(True)
