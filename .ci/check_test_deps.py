"""Fail unless every third-party module that tests/ and benchmarks/ import is importable.

Run by .ci/run inside its fresh virtual environment, after ``pip install .[test]``: a package
missing from the test extras then fails CI by name instead of skipping tests or passing only on a
machine that had it from earlier work. Also runs ``pip check`` (every installed distribution's own
requirements, extras included, are satisfied) and imports gymnasium's MuJoCo environments, whose
imports (imageio, ...) the tests rely on when comparing against gymnasium.
"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Imported only inside try/except by the benchmarks, as optional competitors, never by the tests.
OPTIONAL = {
    "envpool": "bench_rollout.py's EnvPool column (optional baseline)",
    "cut_cross_entropy": "bench_loss.py's Cut Cross-Entropy column (optional baseline)",
}


def imported_modules(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def main() -> int:
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    local = {p.stem for p in files} | {"aihf_fast"}
    third_party = sorted(imported_modules(files) - set(sys.stdlib_module_names) - local)
    missing = []
    for name in third_party:
        if name in OPTIONAL:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure, not just ImportError
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    try:
        importlib.import_module("gymnasium.envs.mujoco.hopper_v5")
    except Exception as exc:  # noqa: BLE001
        missing.append(f"gymnasium.envs.mujoco: {type(exc).__name__}: {exc} (needs gymnasium[mujoco])")
    if missing:
        print("check_test_deps: not importable in the test environment (add to the [test] extra):",
              *missing, sep="\n  ", file=sys.stderr)
        return 1
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if check.returncode != 0:
        print("check_test_deps: pip check failed:\n" + check.stdout + check.stderr, file=sys.stderr)
        return 1
    print(f"check_test_deps: {len(third_party)} third-party modules imported by tests/benchmarks, "
          f"all importable except the optional {sorted(set(third_party) & set(OPTIONAL))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
