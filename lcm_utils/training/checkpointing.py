"""Checkpoints of a run: every stateful part written through a partial folder, and restored on resume (exactly, or
elastically on another number of processes or data readers)."""

import os
import shutil

from .. import checkpoint as ckpt
from ..engines import checkpoint_engine, engine_name, load_optimizer_state, save_optimizer_state, uses_deepspeed
from ..errors import ConfigError


def save_checkpoint(run, step, optimizer, lr_scheduler, stream, generator, adversary=None):
    """Write checkpoint-<step> via a partial folder; the rename happens only after every rank wrote its part."""
    acc, args = run.accelerator, run.args
    folder = ckpt.partial_path(args.output_dir, step)
    if acc.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    acc.wait_for_everyone()
    weights = run.method.snapshot()
    if acc.is_main_process:
        run.method.save_state(folder, weights)
        if adversary:
            adversary.save(folder)
    del weights
    save_optimizer_state(acc, run.method.student_model, optimizer, folder)
    ckpt.write_json(os.path.join(folder, f"rank_{acc.process_index}.json"),
                    {"rng": ckpt.rng_state(generator), "data": stream.state_dict()})
    acc.wait_for_everyone()
    if acc.is_main_process:
        scaler = acc.scaler.state_dict() if acc.scaler is not None else None
        ckpt.write_json(os.path.join(folder, ckpt.STATE_FILE),
                        {"global_step": step, "seed": args.seed, "num_processes": acc.num_processes,
                         "run_id": run.run_id, "engine": engine_name(acc), "teacher": run.teacher_identity,
                         "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler})
        final = ckpt.publish(args.output_dir, step, args.checkpoints_total_limit)
        run.log(f"saved {final}")
    acc.wait_for_everyone()


def resume(run, optimizer, lr_scheduler, stream, generator, adversary=None):
    """Restore everything a checkpoint holds; returns the global step (0 for a new run)."""
    acc, args = run.accelerator, run.args
    path = ckpt.find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        if args.resume_from_checkpoint == "latest":
            run.log(f"no checkpoint in '{args.output_dir}': starting a new run")
        return 0
    state = ckpt.read_json(os.path.join(path, ckpt.STATE_FILE))
    rank_states = [ckpt.read_json(os.path.join(path, f"rank_{r}.json")) for r in range(state["num_processes"])]
    old_workers = rank_states[0]["data"]["num_workers"]
    same_layout = state["num_processes"] == acc.num_processes and old_workers == stream.num_workers
    written_by = checkpoint_engine(state, path)
    if written_by != engine_name(acc) and not (written_by == "DeepSpeed" and uses_deepspeed(acc)):
        raise ConfigError(f"--resume_from_checkpoint: '{path}' was written under {written_by} and this run is under "
                          f"{engine_name(acc)}: the optimizer state has another layout; relaunch with the accelerate "
                          f"config that wrote it")
    if state["num_processes"] != acc.num_processes and uses_deepspeed(acc):
        raise ConfigError(f"--resume_from_checkpoint: '{path}' was written by {state['num_processes']} processes and "
                          f"DeepSpeed keeps one optimizer shard per process; relaunch with that number")
    args.seed = state["seed"]  # a run started without --seed keeps the seed it drew (config, validation)
    run.run_id = state.get("run_id", run.run_id)
    try:
        run.method.load_state(path)
    except RuntimeError as e:  # torch's many-line state-dict report: the first line says enough
        raise ConfigError(f"--resume_from_checkpoint: the weights in '{path}' do not fit this run's student "
                          f"({str(e).strip().splitlines()[0][:160]}); resume with the teacher and flags that wrote "
                          f"it") from None
    load_optimizer_state(acc, run.method.student_model, optimizer, path)
    if adversary and not adversary.load(path):
        run.log(f"note: '{path}' has no discriminator (written without --adv_weight): its heads start fresh")
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if acc.scaler is not None and state["scaler"] is not None:
        acc.scaler.load_state_dict(state["scaler"])
    if same_layout:
        ckpt.set_rng_state(rank_states[acc.process_index]["rng"], generator)
        stream.load_state_dict(rank_states[acc.process_index]["data"])
    else:  # elastic: the same global sample position, split between this run's readers
        stream.load_elastic([rank_state["data"] for rank_state in rank_states])
        if acc.process_index < len(rank_states):
            ckpt.set_rng_state(rank_states[acc.process_index]["rng"], generator)
        else:  # a rank the checkpoint did not have: its own noise stream, not one already used at step 0
            generator.manual_seed(args.seed * 1000 + acc.process_index + 7919 * (state["global_step"] + 1))
        run.log(f"elastic resume: {path} was written by {state['num_processes']} process(es) x {old_workers} data "
                f"reader(s), this run has {acc.num_processes} x {stream.num_workers}: it continues from the same "
                f"sample position, but is not bitwise equal to an uninterrupted run")
    run.log(f"resumed from {path} at step {state['global_step']}")
    return state["global_step"]
