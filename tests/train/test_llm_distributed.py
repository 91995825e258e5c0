"""The trainer under the deepspeed launcher (2 CPU processes, gloo) with ZeRO-2 and ZeRO-3
against one process on the same global batch, and kill-and-resume.

Tolerances: fp32 throughout; the processes reduce gradients in another order than one process
accumulating them, so losses agree to 1e-5 relative and final weights to 1e-5 absolute."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from llm_helpers import final_weights, flags, losses, make_task, read_log, run_trainer

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(str(tmp_path_factory.mktemp("llm_dist")))


def _args(task, out, **kw):
    base = dict(model=task["model"], tokenizer=task["tokenizer"], demonstrations=task["demonstrations"],
                preferences=task["preferences"], method="aihf", steps=4, pairs_per_batch=2, demos_per_batch=2,
                lr=3e-3, max_new_tokens=9, max_length=24, gen_batch_size=8, refresh_every=100, nll_weight=0.1,
                output_dir=out, progress="false")
    base.update(kw)
    return flags(base)


def _check(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _assert_same_run(a, b, tol=1e-5):
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys() and len(la) >= 3
    for s in la:
        assert abs(la[s] - lb[s]) <= tol * max(1.0, abs(la[s])), (s, la[s], lb[s])
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one(task, tmp_path, stage):
    one = str(tmp_path / "one")
    _check(run_trainer(_args(task, one, zero_stage=0, grad_accum=2)))
    two = str(tmp_path / f"two_zero{stage}")
    _check(run_trainer(_args(task, two, zero_stage=stage, grad_accum=1), nproc=2))
    _assert_same_run(one, two)
    la = losses(one)
    assert la[max(la)] < la[1], la  # the loss decreases over a few steps
    s = [r for r in read_log(two) if "loss" in r][0]
    assert s["tokens"] > 0 and "rewards/accuracies" in s


def test_kill_and_resume_matches_uninterrupted(task, tmp_path):
    # refresh every 3 steps, checkpoint every 2, killed (SIGKILL) after step 3: the resumed run
    # restarts at step 2 inside a sample window (restored from the checkpoint), refreshes at 3.
    kw = dict(steps=6, refresh_every=3, save_every=2)
    full = str(tmp_path / "full")
    _check(run_trainer(_args(task, full, **kw)))
    cut = str(tmp_path / "cut")
    r = run_trainer(_args(task, cut, **kw), env_extra={"AIHF_FAST_KILL_AFTER_STEP": "3"})
    assert r.returncode != 0
    assert max(losses(cut)) == 3
    assert open(os.path.join(cut, "checkpoints", "latest")).read().strip() == "step2"
    _check(run_trainer(_args(task, cut, resume="true", **kw)))
    _assert_same_run(full, cut, tol=0.0 + 1e-7)
    assert sorted(losses(cut)) == list(range(1, 7))  # the log holds each step once


def test_existing_run_is_not_overwritten(task, tmp_path):
    out = str(tmp_path / "run")
    _check(run_trainer(_args(task, out, steps=1, method="dpo")))
    r = run_trainer(_args(task, out, steps=1, method="dpo"))
    assert r.returncode == 2 and "--resume" in r.stderr


def _rl_args(task, out, **kw):
    """aihf_rm: two trainable engines (policy, reward model), a frozen reference, RLOO rollouts."""
    base = dict(model=task["model"], tokenizer=task["tokenizer"], demonstrations=task["demonstrations"],
                preferences=task["preferences"], method="aihf_rm", steps=4, rl_steps=2, rm_steps=2, pairs_per_batch=2,
                demos_per_batch=2, prompts_per_batch=2, rloo_k=3, lr=3e-3, rm_lr=2e-3, max_new_tokens=9,
                max_length=24, gen_batch_size=8, replay_size=4, output_dir=out, progress="false")
    base.update(kw)
    return flags(base)


def _assert_same_reward_model(a, b, tol):
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(d, "reward_model", "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_aihf_rm_two_processes_match_one(task, tmp_path, stage):
    one = str(tmp_path / "one")
    _check(run_trainer(_rl_args(task, one, zero_stage=0, grad_accum=2)))
    two = str(tmp_path / f"two_zero{stage}")
    _check(run_trainer(_rl_args(task, two, zero_stage=stage, grad_accum=1), nproc=2))
    _assert_same_run(one, two)
    _assert_same_reward_model(one, two, 1e-5)
    a, b = ([r for r in read_log(d) if "loss" in r] for d in (one, two))
    for ra, rb in zip(a, b):
        for k in ("rl/reward", "rl/kl", "rm/loss"):
            if k in ra:
                assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (k, ra[k], rb[k])


def test_aihf_rm_kill_and_resume_matches_uninterrupted(task, tmp_path):
    # outer iterations of 3 RL steps, checkpoints every 2 steps, killed after step 3: the resumed
    # run restarts at step 2, inside the first iteration (reward model from the checkpoint), and
    # starts the second iteration (own samples, reward steps) at step 3
    kw = dict(steps=6, rl_steps=3, save_every=2)  # with a replay buffer (saved and restored)
    full = str(tmp_path / "full")
    _check(run_trainer(_rl_args(task, full, **kw)))
    cut = str(tmp_path / "cut")
    r = run_trainer(_rl_args(task, cut, **kw), env_extra={"AIHF_FAST_KILL_AFTER_STEP": "3"})
    assert r.returncode != 0
    _check(run_trainer(_rl_args(task, cut, resume="true", **kw)))
    _assert_same_run(full, cut, tol=1e-7)
    _assert_same_reward_model(full, cut, 1e-7)
    assert sorted(losses(cut)) == list(range(1, 7))


def test_two_rate_aihf_with_replay_zero3_and_resume(task, tmp_path):
    """aihf with lr_P (two AdamW updates per step, moments per term, TermAdamW under DeepSpeed) and
    a replay buffer: 2 processes with ZeRO-3 equal to 1 process, and SIGKILL + --resume (the
    per-term moments and the buffer restored) equal to the uninterrupted run."""
    kw = dict(lr_P=5e-4, steps=4, save_every=2, refresh_every=2, replay_size=3)
    one = str(tmp_path / "one")
    _check(run_trainer(_args(task, one, zero_stage=0, grad_accum=2, **kw)))
    two = str(tmp_path / "two")
    _check(run_trainer(_args(task, two, zero_stage=3, grad_accum=1, **kw), nproc=2))
    _assert_same_run(one, two)
    assert all("loss/pref_terms" in r for r in read_log(one) if "loss" in r)
    cut = str(tmp_path / "cut")
    r = run_trainer(_args(task, cut, zero_stage=0, grad_accum=2, **kw), env_extra={"AIHF_FAST_KILL_AFTER_STEP": "3"})
    assert r.returncode != 0
    _check(run_trainer(_args(task, cut, zero_stage=0, grad_accum=2, resume="true", **kw)))
    _assert_same_run(one, cut, tol=1e-7)


def test_sigterm_checkpoints_and_resumes_exactly(task, tmp_path):
    """SIGTERM (a scheduler's preemption): the step in progress finishes, a checkpoint is written
    (step 3 is not a save_every step), the exit code is 143 with a one-line message, and
    --resume equals the uninterrupted run. Under 2 ranks only rank 0 is signalled: both stop
    after the same step."""
    kw = dict(steps=6, save_every=4, refresh_every=3)
    full = str(tmp_path / "full")
    _check(run_trainer(_args(task, full, **kw)))
    cut = str(tmp_path / "cut")
    r = run_trainer(_args(task, cut, **kw), env_extra={"AIHF_FAST_SIGNAL_AFTER_STEP": "3"})
    assert r.returncode == 143, r.stderr[-2000:]
    assert "interrupted by SIGTERM after step 3" in r.stderr and "Traceback" not in r.stderr
    assert open(os.path.join(cut, "checkpoints", "latest")).read().strip() == "step3"
    _check(run_trainer(_args(task, cut, resume="true", **kw)))
    _assert_same_run(full, cut, tol=1e-7)
    two = str(tmp_path / "two")
    r = run_trainer(_args(task, two, zero_stage=2, grad_accum=1, **kw), nproc=2,
                    env_extra={"AIHF_FAST_SIGNAL_AFTER_STEP": "3"})
    assert r.returncode != 0 and "interrupted by SIGTERM after step 3" in r.stdout + r.stderr
    assert open(os.path.join(two, "checkpoints", "latest")).read().strip() == "step3"
    _check(run_trainer(_args(task, two, zero_stage=2, grad_accum=1, resume="true", **kw), nproc=2))
    one = str(tmp_path / "one")  # the same global batch on one process
    _check(run_trainer(_args(task, one, grad_accum=2, **kw)))
    _assert_same_run(one, two)


def test_external_sigterm_mid_run(task, tmp_path):
    """A real SIGTERM from outside at an arbitrary moment: checkpoint, exit 143, exact resume."""
    import signal
    import subprocess
    import sys
    import time

    kw = dict(steps=30, save_every=100, refresh_every=10)
    full = str(tmp_path / "full")
    _check(run_trainer(_args(task, full, **kw)))
    cut = str(tmp_path / "cut")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.Popen([sys.executable, "-m", "aihf_fast.train.llm", *_args(task, cut, **kw)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(cut, "log.jsonl")
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None:
        if os.path.isfile(log) and sum(1 for x in open(log) if '"loss"' in x) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    stopped = max(losses(cut))
    assert 3 <= stopped < 30 and f"after step {stopped}" in err
    _check(run_trainer(_args(task, cut, resume="true", **kw)))
    _assert_same_run(full, cut, tol=1e-7)


@pytest.mark.slow
def test_repeated_two_rank_launches_exit_cleanly(task, tmp_path):
    """20 launches in a row under the deepspeed launcher (2 ranks): the launcher's exit code is 0
    every time (no rank aborting at exit), the final message comes from rank 0 only, and no
    shared-memory buffer is left behind in /dev/shm."""
    import glob

    n = int(os.environ.get("AIHF_FAST_LAUNCHES", "20"))
    shm = "/dev/shm/deepspeed_allreduce_buffer_*"
    for i in range(n):
        before = set(glob.glob(shm))
        out = str(tmp_path / f"run{i}")
        r = run_trainer(flags(dict(model=task["model"], tokenizer=task["tokenizer"], method="sft",
                                   demonstrations=task["demonstrations"], steps=1, demos_per_batch=2, max_length=24,
                                   max_new_tokens=4, eval_prompts=task["eval_prompts"],
                                   eval_reward="aihf_fast.data.synthetic:true_reward", zero_stage=2,
                                   output_dir=out, progress="false")), nproc=2)
        assert r.returncode == 0, (i, r.stdout[-2000:] + r.stderr[-2000:])
        assert "terminate called" not in r.stderr, (i, r.stderr[-2000:])
        assert (r.stdout + r.stderr).count("eval/reward:") == 1, (i, r.stdout[-2000:])
        left = set(glob.glob(shm)) - before  # DeepSpeed's CPU all-reduce buffers (69 MB per rank) are removed
        assert not left, (i, sorted(left))
        shutil.rmtree(out)
