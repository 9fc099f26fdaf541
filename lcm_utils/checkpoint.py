"""Crash-safe checkpoints: written to a partial folder, renamed into place only when every rank is done.

A folder named checkpoint-<step> always holds a complete checkpoint, so `latest` never picks a broken one.
Nothing is pickled: weights are safetensors, optimizer state is loaded with weights_only=True, the rest is JSON;
under DeepSpeed its optimizer partitions are DeepSpeed's own files (written through accelerate's save_state).
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"
STATE_FILE = "trainer_state.json"  # written last by the main process: its presence marks a complete save


def list_checkpoints(output_dir):
    """Complete checkpoints in output_dir as [(step, path)], oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume_checkpoint(output_dir, name):
    """Resolve --resume_from_checkpoint to a folder, or None when 'latest' finds nothing."""
    if name is None:
        return None
    if name == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    for path in (name, os.path.join(output_dir, os.path.basename(name.rstrip("/")))):
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    raise FileNotFoundError(f"--resume_from_checkpoint: '{name}' is not a complete checkpoint in '{output_dir}'")


def final_path(output_dir, step):
    return os.path.join(output_dir, f"checkpoint-{step}")


def partial_path(output_dir, step):
    return os.path.join(output_dir, f"checkpoint-{step}{PARTIAL_SUFFIX}")


def remove_stale_partials(output_dir):
    """Delete leftovers of saves that were killed half-way (main process only)."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-") and name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def publish(output_dir, step, total_limit):
    """Rename the finished partial folder to checkpoint-<step>, then prune the oldest beyond total_limit."""
    final = final_path(output_dir, step)
    if os.path.exists(final):  # a re-save of the same step (e.g. after a resume by name)
        discard(final)
    os.replace(partial_path(output_dir, step), final)
    if total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            discard(old)
    return final


def discard(folder):
    """Delete a checkpoint so that no kill can leave it half-deleted under its name: rename first (atomic)."""
    doomed = folder + ".old" + PARTIAL_SUFFIX
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def save_torch(path, value):
    torch.save(value, path)


def load_torch(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def save_tensors(tensors, path):
    """A flat dict of tensors as safetensors."""
    from safetensors.torch import save_file

    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, path)


def load_tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def _tensor_to_list(t):
    return t.cpu().tolist()


def rng_state(generator):
    """Every random state a rank uses, as JSON-able values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": _tensor_to_list(torch.get_rng_state()),
        "generator": _tensor_to_list(generator.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_list(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state, generator):
    """Inverse of rng_state."""
    as_bytes = lambda values: torch.tensor(values, dtype=torch.uint8)  # noqa: E731
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(as_bytes(state["torch"]))
    generator.set_state(as_bytes(state["generator"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_bytes(s) for s in state["cuda"]])
