"""TCD and PCM objectives: the trajectory consistency function and the phase edges against diffusers' TCDScheduler
and the exact trajectory, and both objectives end to end with stock pipelines."""

import json
import os

import pytest
import torch

from conftest import base_args, check_ok, launch
from lcm_utils.consistency import (ddim_timesteps, phase_edge, phase_edges, sample_trajectory_points,
                                   trajectory_consistency)
from lcm_utils.objectives import PCM, TCD, SolverSchedule, lcd_loss


def tcd_scheduler(prediction_type):
    from diffusers import TCDScheduler

    return TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, prediction_type=prediction_type, original_inference_steps=50)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_trajectory_consistency_is_tcdschedulers_step(prediction_type, gamma):
    """f(z_t, t, s) with s = floor((1 - gamma) * next timestep) equals TCDScheduler.step's pred_noised_sample."""
    scheduler = tcd_scheduler(prediction_type)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    acp = scheduler.alphas_cumprod
    for index, t in enumerate(scheduler.timesteps):
        z, output = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
        scheduler._step_index = index
        expected = scheduler.step(output, t, z, eta=gamma, generator=g).pred_noised_sample
        after = scheduler.timesteps[index + 1] if index + 1 < len(scheduler.timesteps) else torch.tensor(0)
        s = torch.floor((1 - gamma) * after).long().view(1)
        got = trajectory_consistency(output, z, t.view(1), s, acp, prediction_type)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_phases", [1, 2, 4, 5, 8, 50])
def test_phase_edges_are_where_tcdscheduler_steps(num_phases):
    """The edges are the timesteps an M-step TCDScheduler visits after its first, then 0: gamma 0 walks them."""
    scheduler = tcd_scheduler("epsilon")
    scheduler.set_timesteps(num_phases)
    grid = ddim_timesteps(1000, 50)
    edges = phase_edges(grid, num_phases)
    assert edges.tolist() == sorted(scheduler.timesteps[1:].tolist() + [0])
    # Every grid point maps to the largest edge below it; an edge itself to the one below.
    targets = phase_edge(grid, edges)
    for t, e in zip(grid.tolist(), targets.tolist()):
        assert e == max(x for x in edges.tolist() if x < t)


def test_tcd_target_points_are_uniform_over_the_grid_below_the_end():
    grid = ddim_timesteps(1000, 50)
    end = torch.full((20000,), 99)  # grid points 19, 39, 59, 79, 99 and 0 are allowed
    s = sample_trajectory_points(grid, end, torch.Generator().manual_seed(0))
    values, counts = s.unique(return_counts=True)
    assert values.tolist() == [0, 19, 39, 59, 79, 99]
    assert (counts.float() / len(s) - 1 / 6).abs().max() < 0.01
    assert sample_trajectory_points(grid, torch.zeros(3, dtype=torch.long)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("objective", [TCD(), PCM(4), PCM(1)])
def test_an_exact_model_has_zero_loss(objective):
    """A model that predicts the true noise of a known z0: its DDIM jumps stay on the true trajectory, so TCD's and
    PCM's consistency functions agree exactly (LCM's c_skip/c_out form does not: see test_objective)."""
    from diffusers import DDPMScheduler

    schedule = SolverSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012), 50, 10.0, "cpu")
    z0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def oracle(z, t, cond, w=None):
        z_ref = z0.repeat(z.shape[0] // z0.shape[0], 1, 1, 1)
        alpha = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        return (z - alpha * z_ref) / sigma

    c = {"encoder_hidden_states": torch.randn(6, 77, 32)}
    loss = lcd_loss(z0, c, {"encoder_hidden_states": torch.zeros(1, 77, 32)}, torch.full((6,), 5.0), oracle, oracle,
                    oracle, schedule, "l2", None, torch.Generator().manual_seed(1), objective)
    assert loss.item() < 1e-9


def test_a_teacher_copy_walks_the_teachers_ddim_path_edge_to_edge():
    """PCM with the teacher as student: M deterministic TCDScheduler steps equal the chain of DDIM jumps edge to
    edge that the consistency function defines (the teacher's own M-step DDIM path on the grid)."""
    scheduler = tcd_scheduler("epsilon")
    scheduler.set_timesteps(4)
    acp = scheduler.alphas_cumprod
    edges = phase_edges(ddim_timesteps(1000, 50), 4)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) * 0.1

    def teacher(z, t):  # any deterministic function of (z, t)
        return torch.einsum("ij,bjhw->bihw", weight, z) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    ours, theirs = z.clone(), z.clone()
    for t in scheduler.timesteps:
        theirs = scheduler.step(teacher(theirs, t.view(1)), t, theirs, eta=0.0).prev_sample
        ours = trajectory_consistency(teacher(ours, t.view(1)), ours, t.view(1), phase_edge(t.view(1), edges), acp,
                                      "epsilon")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("script, objective", [("train_lcm_distill.py", "tcd"), ("train_lcm_distill.py", "pcm"),
                                               ("train_lcm_lora.py", "pcm")])
def test_objectives_end_to_end_export_their_scheduler(assets, tmp_path, script, objective):
    """Each objective trains, validates with its sampler, exports TCDScheduler with the run's grid, and the model
    card says how to sample; the output samples in a stock pipeline through scripts/sample.py."""
    import subprocess
    import sys

    from conftest import ROOT, script_env

    out = str(tmp_path / "out")
    extra = {"lora_rank": 4} if "lora" in script else {}
    check_ok(launch(script, base_args(assets, out, max_train_steps=2, validation_steps=2, objective=objective,
                                      num_phases=2, tcd_gamma=0.5, num_ddim_timesteps=10, **extra)))
    config = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert config["_class_name"] == "TCDScheduler" and config["original_inference_steps"] == 10
    card = open(os.path.join(out, "README.md")).read()
    assert "TCDScheduler.from_pretrained" in card
    assert (", eta=0.5)" in card) if objective == "tcd" else ("num_inference_steps=2," in card and "eta=0)" in card)
    assert os.path.isfile(os.path.join(out, "validation", "step-000002.png"))
    result = subprocess.run([sys.executable, "scripts/sample.py", "--model", out, "--steps", "1", "2", "--out",
                             str(tmp_path / "grid.png"), "--device", "cpu"], cwd=ROOT, env=script_env(),
                            capture_output=True, text=True, timeout=300)
    check_ok(result)
    assert os.path.isfile(tmp_path / "grid.png")


def test_objective_flags_are_checked(assets, tmp_path, capsys):
    from test_interrupts import run_in_process

    for flags, message in ((dict(objective="pcm", num_phases=60), "--num_phases must be in 1..50"),
                           (dict(objective="tcd", tcd_gamma=1.5), "--tcd_gamma must be in [0, 1], got 1.5")):
        with pytest.raises(SystemExit) as info:
            run_in_process(base_args(assets, str(tmp_path / "out"), **flags))
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_quality_benchmark_checks_the_issues_targets(monkeypatch):
    """benchmarks/quality.py's target lines for TCD/PCM: a student beats the untrained one per step count only on
    both colour+shape and FD; 'no worse from 4 to 8' fails on any metric that gets worse; eta overrides parse."""
    import argparse

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import quality
    from lcm_utils import evaluation as ev

    def row(*points):  # (endpoint, both, fd) at 1, 2, 4, 8 steps
        return {s: dict(zip(("endpoint", "both", "fd"), p)) for s, p in zip((1, 2, 4, 8), points)}

    rows = {"DDIM (teacher, CFG)": row((1.4, .14, 3.9), (2.3, .21, 2.6), (1.1, .51, 1.2), (.27, .91, .46)),
            quality.UNTRAINED: row((.48, .13, 2.1), (.33, .56, .89), (.48, .75, .67), (.69, .81, .63)),
            "A": row((.5, .5, 1.3), (.3, .84, .72), (.25, .84, .66), (.25, .85, .64)),  # FD at 8 above untrained
            "B": row((.9, .4, 1.8), (.3, .80, .80), (.26, .80, .70), (.26, .82, .62))}  # FD at 4 above untrained
    met = dict(quality.check_targets(rows, [1, 2, 4, 8]))
    assert met["1 step: a student beats the untrained student on colour+shape and FD (A, B)"]
    assert met["4 steps: a student beats the untrained student on colour+shape and FD (A)"]
    assert met["8 steps: a student beats the untrained student on colour+shape and FD (B)"]
    assert met["A no worse from 4 to 8 steps on any metric"]  # endpoint equal, the others better
    assert met["B no worse from 4 to 8 steps on any metric"]
    assert not met["A moonshot: 4 steps as good as DDIM-8 on colour+shape and FD"]
    rows["A"][8]["endpoint"] = 0.26
    assert not dict(quality.check_targets(rows, [1, 2, 4, 8]))["A no worse from 4 to 8 steps on any metric"]

    parser = argparse.ArgumentParser()
    assert ev.student_spec("P=full:/x/pcm", parser.error) == ("P", "full", "/x/pcm", None)
    assert ev.student_spec("T=lora:/x/tcd,eta=0.5", parser.error) == ("T", "lora", "/x/tcd", 0.5)
    for bad in ("H=half:/x", "full:/x", "T=lora:/x,eta=2", "T=lora:/x,eta=high"):
        with pytest.raises(SystemExit):
            ev.student_spec(bad, parser.error)
