#!/usr/bin/env python
"""On CUDA: train a few steps with PyTorch's sync debug mode set to "error" inside the step, so any operation that
makes the host wait for the GPU there (an .item(), a bool() of a device tensor, a copy from pageable memory)
raises with its stack. The looks (every --logging_steps), checkpoints and validation may wait: the mode is off
for them. Prints "sync check OK" or fails.

    python scripts/sync_check.py train_lcm_distill.py --pretrained_teacher_model ... (the script's own flags)
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    if not torch.cuda.is_available():
        sys.exit("sync_check needs CUDA (the debug mode watches CUDA synchronisations)")
    import lcm_utils.training.loop as training
    from lcm_utils.training import main

    script, argv = sys.argv[1], sys.argv[2:]
    method_cls = {"train_lcm_distill.py": "FullDistillation", "train_lcm_lora.py": "LoraDistillation"}[
        os.path.basename(script)]
    module = __import__(os.path.basename(script)[:-3])
    steps = []

    def allowed(function):
        """Run `function` with the debug mode off (a look, checkpoint or validation may wait for the device)."""
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("default")
            try:
                return function(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return wrapped

    training.StepHealth.look = allowed(training.StepHealth.look)
    training.save_checkpoint = allowed(training.save_checkpoint)
    training.run_validation = allowed(training.run_validation)
    base = getattr(module, method_cls)

    class Watched(base):
        def update_target(self, gate=None):
            super().update_target(gate)
            steps.append(1)
            if len(steps) == 2:  # the first step warms up (allocations, lazy inits): watched from the second on
                torch.cuda.set_sync_debug_mode("error")

    training.finish = allowed(training.finish)
    code = main(Watched, "sync check", argv)
    torch.cuda.set_sync_debug_mode("default")
    if code == 0 and len(steps) >= 3:
        print(f"sync check OK: {len(steps) - 1} steps ran without the host waiting for the GPU inside a step")
    else:
        sys.exit(f"sync check: run ended with {code} after {len(steps)} steps")


if __name__ == "__main__":
    main()
