"""Run a training script under accelerate's FSDP2 or DeepSpeed on CPU processes (gloo), for the tests.

    accelerate launch --config_file configs/accelerate_fsdp.yaml ... tests/engine_on_cpu.py SCRIPT ARGS...

accelerate turns these engines on only for accelerator devices. FSDP (launched with ACCELERATE_USE_CPU=1):
on CPU accelerate keeps DDP (MULTI_CPU) and drops the FSDP plugin its launcher built from the config; torch's
FSDP2 shards over gloo as well, so the state is promoted to FSDP with that plugin, as on a GPU. DeepSpeed
(launched without it; DeepSpeed's own CPU accelerator talks gloo): accelerate finds no backend for a CPU
process and counts one process of one, so the backend is set to gloo as for CPU DDP. The script runs unchanged.
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__
_prepare_backend = PartialState._prepare_backend
_plugin = []  # the FSDP plugin the Accelerator passed; later AcceleratorState() calls (no arguments) re-derive


def _init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and not _plugin:
        _plugin.append(fsdp_plugin)
    if _plugin and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = _plugin[0]


def _backend_with_gloo(self, cpu=False, sagemaker_dp=False, backend=None):
    found, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return found, distributed_type


def _poison_losses(calls):
    """NaN losses on the consistency-loss calls listed (counting from 0), as tests/test_interrupts.py does in
    process."""
    import lcm_utils.training.loop as training

    real_loss, seen = training.LOSSES["l2"], []

    def poisoned(*args, **kwargs):
        seen.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(seen) - 1 in calls else loss

    training.LOSSES["l2"] = poisoned


if __name__ == "__main__":
    AcceleratorState.__init__ = _init_with_fsdp
    PartialState._prepare_backend = _backend_with_gloo
    if os.environ.get("ENGINE_TEST_NAN_CALLS"):
        _poison_losses({int(n) for n in os.environ["ENGINE_TEST_NAN_CALLS"].split(",")})
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
