import subprocess
import sys

from aihf_fast.cli import main
from aihf_fast.demo import run


def test_demo_learns_on_the_toy_task():
    before, after = run(steps=80, seed=1, log_every=1000)
    assert after > before + 0.2, (before, after)


def test_demo_runs_the_triton_kernels():
    # the same loop through the Triton backend (interpreted on CPU): a few steps, same numbers
    torch_run = run(steps=3, pairs=2, demos=2, seed=3, backend="torch", log_every=1000)
    triton_run = run(steps=3, pairs=2, demos=2, seed=3, backend="triton", log_every=1000)
    assert abs(torch_run[1] - triton_run[1]) < 1e-6


def test_cli(capsys):
    assert main(["info"]) in (0, None)
    assert "auto backend" in capsys.readouterr().out
    assert main(["nope"]) == 2
    out = subprocess.run([sys.executable, "-m", "aihf_fast", "demo", "--steps", "2"], capture_output=True, text=True)
    assert out.returncode == 0 and "before" in out.stdout, out.stderr
