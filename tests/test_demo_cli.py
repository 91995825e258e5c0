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


def test_no_command_is_an_error_and_every_option_has_help_and_a_default(capsys):
    """`aihf-fast` alone exits non-zero with the usage; each trainer's --help gives every option a
    help line and its default; task options without --synthetic are refused by name."""
    import dataclasses

    import pytest

    from aihf_fast.train.control.config import ControlConfig
    from aihf_fast.train.llm.config import LLMTrainConfig, build_parser, parse_args
    from aihf_fast.train.options import ConfigError

    assert main([]) == 2 and "usage: aihf-fast" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "usage: aihf-fast" in capsys.readouterr().out
    for cls in (LLMTrainConfig, ControlConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    text = " ".join(build_parser().format_help().split())
    for f in dataclasses.fields(LLMTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        seg = text.split(flag + " ", 1)[1].split(" --", 1)[0]
        assert "default" in seg, (flag, seg)
    assert "--num-demos NUM_DEMOS demonstrations (default: 2000)" in text
    with pytest.raises(ConfigError, match="--design: options of the --synthetic job"):
        parse_args(["--design", "B", "--model", "m"])


def test_abbreviated_flags_are_refused():
    """--synth is not --synthetic (the job is chosen by the exact flag): abbreviations are errors."""
    import pytest

    from aihf_fast.train.llm.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--synth", "--model", "m"])
