"""Per-term step sizes: ``TermAdamW`` against two ``torch.optim.AdamW`` on the same parameters
(each term its own moments and rate), its state round trip, and the LLM trainer's two-rate
``aihf`` step against the two updates written out with the joint loss split in two."""
from __future__ import annotations

import copy

import pytest
import torch

from aihf_fast.train.optim import TermAdamW


def _grads(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_term_adamw_equals_one_adamw_per_term():
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ref = w.detach().clone().requires_grad_(True)
    kw = dict(lr=0.1, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.01)
    opt = TermAdamW([w], {"D": 1.0, "P": 0.25}, **kw)
    ref_D = torch.optim.AdamW([ref], **kw)
    ref_P = torch.optim.AdamW([ref], **dict(kw, lr=0.025))
    for k, term in enumerate("DPDDPP"):
        g = _grads(k, w.shape)
        w.grad, ref.grad = g.clone(), g.clone()
        opt.term = term
        opt.step()
        (ref_D if term == "D" else ref_P).step()
        torch.testing.assert_close(w, ref, atol=1e-12, rtol=0)
    st = opt.state[w]["terms"]
    assert int(st["D"]["step"]) == 3 and int(st["P"]["step"]) == 3 and set(opt.state[w]) == {"terms"}
    assert opt.param_groups[0]["lr"] == 0.1  # the P factor is applied only inside its step
    # written out, the first update of a term from fresh moments is lr * g / (|g| + eps) (+ decay)
    v = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    o = TermAdamW([v], {"D": 1.0, "P": 0.5}, lr=0.1, eps=0.5, weight_decay=0.0)
    v.grad = torch.tensor([2.0, -1.0], dtype=torch.float64)
    o.term = "P"
    o.step()
    torch.testing.assert_close(v.detach(), -0.05 * torch.tensor([2 / 2.5, -1 / 1.5], dtype=torch.float64))


def test_term_adamw_state_round_trip_and_bad_term():
    w = torch.zeros(4, requires_grad=True)
    opt = TermAdamW([w], {"D": 1.0, "P": 0.1}, lr=0.01)
    for k, term in enumerate("DP"):
        w.grad = _grads(k, w.shape).float()
        opt.term = term
        opt.step()
    w2 = w.detach().clone().requires_grad_(True)
    opt2 = TermAdamW([w2], {"D": 1.0, "P": 0.1}, lr=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k, term in enumerate("PD", start=5):
        g = _grads(k, w.shape).float()
        w.grad, w2.grad = g.clone(), g.clone()
        opt.term = opt2.term = term
        opt.step(), opt2.step()
    torch.testing.assert_close(w, w2, atol=0, rtol=0)
    opt.term = "X"
    with pytest.raises(ValueError, match="TermAdamW.term must be one of"):
        opt.step()
    with pytest.raises(ValueError, match="term_lr_scale"):
        TermAdamW([w], {"D": 0.0})


def test_two_rate_aihf_step_is_the_two_updates(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from aihf_fast.train.llm import LLMTrainConfig, Trainer

    from llm_helpers import make_task

    task = make_task(str(tmp_path / "t"), num_demos=12, num_pairs=8)
    cfg = dict(model=task["model"], tokenizer=task["tokenizer"], demonstrations=task["demonstrations"],
               preferences=task["preferences"], method="aihf", steps=3, pairs_per_batch=3, demos_per_batch=2,
               nll_weight=0.2, beta=0.5, max_new_tokens=9, max_length=24, gen_batch_size=8, lr=1e-2, lr_P=2e-3,
               weight_decay=0.01, max_grad_norm=0.0, output_dir=str(tmp_path / "o"), progress=False)
    tr = Trainer(LLMTrainConfig(**cfg))
    tr.refresh(0)
    joint_in, joint_kw = tr.micro_batch(0, 0)
    parts = [tr.micro_batch(0, 0, t) for t in ("D", "P")]
    ref = copy.deepcopy(tr.policy)
    with torch.no_grad():  # the two terms add up to the joint loss
        joint = float(tr.policy(joint_in, joint_kw)["loss"])
        split = sum(float(tr.policy(i, k)["loss"]) for i, k in parts)
    assert abs(joint - split) < 1e-5 * max(1.0, abs(joint))
    params = [p for p in ref.parameters() if p.requires_grad]
    kw = dict(betas=(0.9, 0.999), weight_decay=0.01)
    logged = 0.0
    for (inputs, k), lr in zip(parts, (1e-2, 2e-3)):  # demonstration terms at lr, then pairs at lr_P
        opt = torch.optim.AdamW(params, lr=lr, **kw)
        for p in params:
            p.grad = None
        loss = ref(inputs, k)["loss"]
        loss.backward()
        opt.step()
        logged += float(loss.detach())  # each term where it is taken: L_D(theta), L_P(theta')
    m = tr.train_step(0)
    assert abs(m["loss"] - logged) < 1e-5 * max(1.0, abs(logged))
    assert abs(m["lr_P"] - 2e-3) < 1e-12 and "loss/demo_terms" in m and "loss/pref_terms" in m
    for (name, a), b in zip(tr.policy.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0, msg=name)


def test_two_rate_split_without_demonstration_comparisons_and_copy(tmp_path):
    """w_D = 0 with an NLL term: the pairs keep their full weight in the P update (L_D + L_P = the
    joint loss), and a copied TermAdamW keeps its terms."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from aihf_fast.train.llm import LLMTrainConfig, Trainer

    from llm_helpers import make_task

    task = make_task(str(tmp_path / "t"), num_demos=12, num_pairs=8)
    tr = Trainer(LLMTrainConfig(model=task["model"], tokenizer=task["tokenizer"], demonstrations=task["demonstrations"],
                                preferences=task["preferences"], method="aihf", w_D=0.0, nll_weight=0.2, lr_P=1e-4,
                                pairs_per_batch=3, demos_per_batch=2, max_length=24, steps=2,
                                output_dir=str(tmp_path / "o"), progress=False))
    tr.refresh(0)
    with torch.no_grad():
        joint = float(tr.policy(*tr.micro_batch(0, 0))["loss"])
        split = sum(float(tr.policy(*tr.micro_batch(0, 0, t))["loss"]) for t in ("D", "P"))
    assert abs(joint - split) < 1e-5 * max(1.0, abs(joint))
    w = torch.zeros(2, requires_grad=True)
    opt = TermAdamW([w], {"D": 1.0, "P": 0.5}, lr=0.1)
    opt.term = "P"
    c = copy.deepcopy(opt)
    assert c.term == "P" and c.term_lr_scale == {"D": 1.0, "P": 0.5}


def test_stop_on_signal_first_records_second_aborts(monkeypatch):
    """The first signal is recorded; a second within the grace window is the same stop (Ctrl-C
    plus the launcher's forwarded SIGTERM); a later one aborts."""
    import os
    import signal

    from aihf_fast.train import preemption

    before = signal.getsignal(signal.SIGINT)
    with preemption.StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() == signal.SIGINT
        os.kill(os.getpid(), signal.SIGTERM)  # at once: the same stop
        assert stop.requested() == signal.SIGINT
        monkeypatch.setattr(preemption, "GRACE_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_interrupted_pickles_whole():
    """An Interrupted raised in a process-pool worker reaches its parent as itself."""
    import pickle
    import signal

    from aihf_fast.train.preemption import Interrupted

    e = pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM, 7, "/ckpt/step7", 1)))
    assert (e.signum, e.step, e.checkpoint, e.rank, e.exit_code) == (signal.SIGTERM, 7, "/ckpt/step7", 1, 143)
    assert str(e) == str(Interrupted(signal.SIGTERM, 7, "/ckpt/step7", 1)) and "--resume" in str(e)


def test_stop_on_signal_start_up_mode_and_process_exit(tmp_path):
    """Start-up mode raises Interrupted at once and leaves no handler or active instance behind;
    under main_then_exit the same stop delivered again while the command reports is ignored (a
    fresh process, so that a failure cannot kill the test run)."""
    import signal
    import subprocess
    import sys

    from aihf_fast.train import preemption

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(preemption.Interrupted, match="while a run was starting"):
        with preemption.StopOnSignal() as stop:
            stop.starting()
            with preemption.StopOnSignal() as inner:  # nested: the same instance
                assert inner is stop
                import os

                os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before and preemption.StopOnSignal._active is None
    script = tmp_path / "twice.py"
    script.write_text(
        "import os, signal, sys\n"
        "from aihf_fast.train.preemption import Interrupted, StopOnSignal, main_then_exit\n"
        "def main(argv):\n"
        "    try:\n"
        "        with StopOnSignal() as stop:\n"
        "            stop.starting()\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "    except Interrupted as e:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # the launcher forwards the stop again\n"
        "        print('reported', flush=True)\n"
        "        return e.exit_code\n"
        "sys.exit(main_then_exit(main))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and "reported" in r.stdout and "Traceback" not in r.stderr, (r.returncode, r.stderr)


@pytest.mark.parametrize("world", ["1", "2"])
def test_llm_command_exit_under_a_launcher_keeps_atexit_and_exit_code(tmp_path, world):
    """The LLM command under a multi-process launcher (WORLD_SIZE > 1) ends with os._exit after its
    run: the atexit handlers still run and the exit code is the run's (here a bad option: 2, one
    line); a single process exits normally."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "from aihf_fast.train.llm.cli import main_then_exit\n"
        "sys.exit(main_then_exit(['--model', 'x', '--method', 'nonsense']))\n")
    env = dict(__import__("os").environ, WORLD_SIZE=world)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout.count("atexit ran") == 1 and "method must be one of" in r.stderr and "Traceback" not in r.stderr
