"""``aihf-fast`` console command: ``demo``, ``train-llm``, ``train-control`` and ``info``."""
from __future__ import annotations

import sys


def _info(argv):
    import platform

    import torch

    from .ops._backend import resolve_backend, triton_available

    print(f"aihf_fast {__import__('aihf_fast').__version__}; python {platform.python_version()}; torch {torch.__version__}")
    print(f"triton installed: {triton_available()}; CUDA: {torch.cuda.is_available()}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"auto backend for {dev} tensors: {resolve_backend('auto', torch.empty(0, device=dev))}")


COMMANDS = {"demo": "aihf_fast.demo", "info": None, "train-llm": "aihf_fast.train.llm",
            "train-control": "aihf_fast.train.control"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        if argv and not asked:
            print(f"aihf-fast: unknown command {argv[0]!r}", file=sys.stderr)
        print("usage: aihf-fast {demo,train-llm,train-control,info} [options]\n"
              "  demo           train a tiny policy with the AIHF loss on a toy task with a known reward\n"
              "  train-llm      the LLM trainer (= python -m aihf_fast.train.llm; --help for its options)\n"
              "  train-control  the MuJoCo control trainer (= python -m aihf_fast.train.control)\n"
              "  info           versions and the backend the ops will use", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2  # no command is an error, as for argparse
    if argv[0] == "info":
        return _info(argv[1:])
    if argv[0] == "train-llm":
        from .train.llm.cli import main_then_exit

        return main_then_exit(argv[1:])
    if argv[0] == "train-control":
        from .train.control.cli import main as control_main
        from .train.preemption import main_then_exit

        return main_then_exit(control_main, argv[1:])
    from .demo import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
