"""The shape of the code (issue 18): small modules and functions, short scripts. The import layers are checked by
import-linter (.importlinter) in scripts/test.sh."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_SCRIPT_LINES = 450, 100, 250


def line_count(path):
    with open(path) as f:
        return sum(1 for _ in f)


def test_no_module_of_lcm_utils_is_over_450_lines():
    modules = glob.glob(os.path.join(ROOT, "lcm_utils", "**", "*.py"), recursive=True)
    assert len(modules) > 20
    too_long = {os.path.relpath(p, ROOT): n for p in modules if (n := line_count(p)) > MAX_MODULE_LINES}
    assert not too_long


def test_no_function_is_over_100_lines():
    files = glob.glob(os.path.join(ROOT, "lcm_utils", "**", "*.py"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "train_*.py"))
    too_long = []
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long


def test_both_scripts_are_under_250_lines():
    for script in ("train_lcm_distill.py", "train_lcm_lora.py"):
        assert line_count(os.path.join(ROOT, script)) < MAX_SCRIPT_LINES, script


def test_shared_code_does_not_ask_which_family_method_or_objective_it_runs():
    """The loop, checkpoints, validation and export ask the family, method and objective objects; they never
    compare names ("SDXL", "lora", "pcm") or hard-code a denoiser or pipeline class."""
    shared = glob.glob(os.path.join(ROOT, "lcm_utils", "training", "*.py")) + [
        os.path.join(ROOT, "lcm_utils", name) for name in ("evaluation.py", "precompute.py", "engines.py")]
    forbidden = ("args.objective ==", "family.name ==", '"lora" in', "UNet2DConditionModel", "StableDiffusionPipeline",
                 "StableDiffusionXLPipeline", "DDPMScheduler")
    found = [f"{os.path.relpath(p, ROOT)}: {word}" for p in shared for word in forbidden if word in open(p).read()]
    assert not found
