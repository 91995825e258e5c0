"""What every benchmark records next to its numbers: the commit, library versions, the device."""
from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit():
    """HEAD of this checkout (None outside git), with "+dirty" when tracked files differ from it.
    AIHF_FAST_COMMIT overrides it (a copy whose git reports a stale HEAD, e.g. the device machine's)."""
    if os.environ.get("AIHF_FAST_COMMIT"):
        return os.environ["AIHF_FAST_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}+dirty" if head and dirty else head
    except Exception:  # noqa: BLE001
        return None


def versions(*extra: str) -> dict:
    """Python and installed versions of torch, numpy, triton, transformers, deepspeed and ``extra``
    distributions (None where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "triton", "transformers", "deepspeed", *extra):
        out[name] = None
        for dist in (name, name.replace("_", "-")):
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]


def mean_signal(signals) -> tuple:
    """The mean over tuning seeds of selection signals (tuples, larger is better), each element to 6
    decimals: accuracies are counts of held-out pairs held in float32, whose means over seeds differ
    in the last bits for equal totals (0.84 and 0.86 against 0.85 twice); rounded, they tie and the
    next element decides."""
    import numpy as np

    return tuple(round(float(np.mean(v)), 6) for v in zip(*signals))


def ci95(x) -> float:
    """Half-width of the 95% t-interval of the mean of x (nan for fewer than 2 values)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    t = T95[len(x) - 2] if len(x) - 1 <= len(T95) else 1.96
    return float(t * x.std(ddof=1) / np.sqrt(len(x)))


def device_name():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def cpu_name() -> str:
    """The processor's model name and how many cores this process may use (for CPU-only benchmarks)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({model}, {cores} cores)"


def print_result(row: dict) -> None:
    """A child process's result, for ``child_result`` in its parent."""
    print("RESULT " + json.dumps(row), flush=True)


def child_result(cmd: list, **kw) -> tuple[dict | None, str]:
    """Run ``cmd`` (``subprocess.run`` keywords: env, cwd) -> (the last row it printed with
    ``print_result``, or None; its stderr)."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    return (json.loads(lines[-1][len("RESULT "):]) if lines else None), r.stderr


def read_records(rec_dir: str, keys, missing_ok: bool = False) -> dict:
    """{key: record} of the per-run records rec_dir/KEY.json (``run_jobs``'s); with ``missing_ok``
    the keys without a record are left out (what a grid has made so far)."""
    out = {}
    for k in keys:
        path = os.path.join(rec_dir, k + ".json")
        if missing_ok and not os.path.isfile(path):
            continue
        with open(path) as f:
            out[k] = json.load(f)
    return out


def saved_records(result_path: str, benchmark: str, profile_config: dict, key_of=lambda r: r["key"]) -> dict:
    """{key: record} of a saved grid result (its JSON's "records"; ``--records-from``): only one of
    the same benchmark and profile configuration, else SystemExit naming the argument."""
    try:
        with open(result_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--records-from: cannot read {result_path!r}: {e}") from None
    if not isinstance(saved, dict) or saved.get("benchmark") != benchmark or not isinstance(saved.get("records"), list):
        raise SystemExit(f"--records-from: {result_path} is not a saved {benchmark} result with records")
    if json.dumps(saved.get("profile_config"), sort_keys=True) != json.dumps(profile_config, sort_keys=True):
        raise SystemExit(f"--records-from: {result_path} was made with another profile configuration "
                         f"({saved.get('profile')!r}) than this run's")
    out = {}
    for i, r in enumerate(saved["records"]):
        try:
            key = key_of(r)
        except (KeyError, TypeError, AttributeError):
            raise SystemExit(f"--records-from: record {i} of {result_path} is not a record of this grid") from None
        if key in out:
            raise SystemExit(f"--records-from: {result_path} holds two records of {key}")
        out[key] = r
    return out


def files_digest(root: str, patterns) -> str:
    """sha256 over the files under ``root`` matching the glob ``patterns`` (names and bytes, in
    sorted order): a job's output files, to tell whether a remade one is the same."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted({p for pat in patterns for p in Path(root).glob(pat) if p.is_file()}):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _made_records(rec_dir: str, keys) -> dict:
    """{key: record} of the readable records in rec_dir (a cut-short one counts as missing, as in ``run_jobs``)."""
    out = {}
    for k in keys:
        try:
            with open(os.path.join(rec_dir, k + ".json"), encoding="utf-8") as f:
                out[k] = json.load(f)
        except (OSError, ValueError):
            pass
    return out


def restore_records(saved: dict, jobs: list, rec_dir: str, source: str = "", makes_files=lambda j: j["kind"] != "run",
                    fingerprint=None):
    """Write into ``rec_dir`` the ``saved`` records ({key: record}) of ``jobs`` (the whole plan)
    that it lacks, so that a grid continues on a machine without its run directory. A job that
    leaves files behind (``makes_files``: a model, a dataset; they are not in the saved JSON) keeps
    a restored record (marked ``restored_from``) only while every job that depends on it has a
    record; otherwise it is left out, or removed if restored earlier, so that it runs again and
    remakes its files before a job that needs them (transitively), and its saved record waits in
    rec_dir/to_compare/ for ``check_remade_inputs``. Call it before every run, with ``saved={}``
    too. With ``fingerprint``, an input made here that differs from its saved record stops the
    restore (SystemExit) when saved records made from it would be written: they would be paired
    with runs made here from another input. Returns (keys written, keys removed)."""
    keys = [j["key"] for j in jobs]
    made = _made_records(rec_dir, keys)
    if fingerprint is not None:
        incoming = set(saved) - set(made)
        for j in jobs:
            k = j["key"]
            if k in made and k in saved and makes_files(j) and fingerprint(made[k]) != fingerprint(saved[k]):
                clash = sorted(i["key"] for i in jobs if i["key"] in incoming and k in i["deps"])
                if clash:
                    raise SystemExit(f"--records-from: {k} in {rec_dir} differs from the one in {source or 'the saved records'}"
                                     f", and {len(clash)} saved records made from that one (e.g. {clash[0]}) would "
                                     "be paired with runs made here from this one: use a new --work")
    fileless = {k for k, r in made.items() if isinstance(r, dict) and "restored_from" in r}
    fileless |= set(saved) - set(made)
    done = (set(made) | set(saved)) & set(keys)
    dependants = {}
    for j in jobs:
        for d in j["deps"]:
            dependants.setdefault(d, []).append(j["key"])
    changed = True
    while changed:  # an input without its files, needed by a job that runs: it runs again first
        changed = False
        for j in jobs:
            k = j["key"]
            if k in done and k in fileless and makes_files(j) and any(d not in done for d in dependants.get(k, [])):
                done.discard(k)
                changed = True
    os.makedirs(os.path.join(rec_dir, "to_compare"), exist_ok=True)
    written, removed = [], []
    for j in jobs:
        k, path = j["key"], os.path.join(rec_dir, j["key"] + ".json")
        if k in fileless and k not in done and makes_files(j):  # to remake: keep what it was to compare
            pending = os.path.join(rec_dir, "to_compare", k + ".json")
            if not os.path.isfile(pending):
                _write_json(pending, made.get(k, saved.get(k)))
            if k in made:
                os.remove(path)
                removed.append(k)
        elif k in done and k not in made:
            _write_json(path, dict(saved[k], restored_from=source) if makes_files(j) else saved[k])
            written.append(k)
    return written, removed


def _write_json(path: str, obj, indent=None) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)  # never a half-written file


def _pending_inputs(rec_dir: str) -> list:
    """Keys of the inputs waiting in rec_dir/to_compare/ (``restore_records``)."""
    pend_dir = os.path.join(rec_dir, "to_compare")
    return sorted(f[:-5] for f in os.listdir(pend_dir) if f.endswith(".json")) if os.path.isdir(pend_dir) else []


def check_remade_inputs(jobs: list, rec_dir: str, fingerprint) -> None:
    """Compare each input remade after ``restore_records`` (its earlier record in
    rec_dir/to_compare/) with that record by ``fingerprint(record)``, wherever a record in rec_dir
    was made from the earlier one, directly or through another remade input (``jobs``: the whole
    plan). A difference stops the grid
    (SystemExit; again on every rerun): those runs would be paired with new runs on other inputs.
    An input not remade yet stays pending; a compared or unused one is settled."""
    pend_dir, pending = os.path.join(rec_dir, "to_compare"), _pending_inputs(rec_dir)
    if not pending:
        return
    made = _made_records(rec_dir, [j["key"] for j in jobs])
    kept = set(made) - set(pending)  # records not remade: what they were made from must not change
    deps = {j["key"]: j["deps"] for j in jobs}
    used, stack = set(), [d for k in kept for d in deps.get(k, [])]
    while stack:  # what they were made from, also through a remade input (expert -> data -> run)
        d = stack.pop()
        if d not in used:
            used.add(d)
            stack.extend(deps.get(d, []) if d in pending else [])
    differ = []
    for k in pending:
        if k not in made:
            continue
        with open(os.path.join(pend_dir, k + ".json"), encoding="utf-8") as f:
            before = json.load(f)
        if k in used and fingerprint(made[k]) != fingerprint(before):
            differ.append(k)
        else:
            os.remove(os.path.join(pend_dir, k + ".json"))
    if differ:
        raise SystemExit(f"remade {differ} differ from the records they replace (another CPU or library build?): "
                         f"the runs in {rec_dir} made from those would be paired with runs on other inputs; continue "
                         f"where they were made, or delete the records of those runs and rerun without --records-from")


def remake_inputs_first(jobs: list, plan: list, rec_dir: str, run, fingerprint) -> list:
    """After ``restore_records``: run (``run(jobs)``, the grid's ``run_jobs``) the inputs of this
    slice (``jobs``) that wait to be remade, with what they depend on, before anything else; then
    ``check_remade_inputs`` over the whole ``plan``. Returns the keys remade."""
    pending = set(_pending_inputs(rec_dir))
    made = _made_records(rec_dir, [j["key"] for j in jobs])
    by_key = {j["key"]: j for j in jobs}
    remake = {k for k in pending if k in by_key and k not in made}
    need, stack = set(), list(remake)
    while stack:  # what they depend on (cached ones are skipped by run_jobs)
        k = stack.pop()
        if k not in need and k in by_key:
            need.add(k)
            stack.extend(by_key[k]["deps"])
    if remake:
        run([j for j in jobs if j["key"] in need])
    check_remade_inputs(plan, rec_dir, fingerprint)
    return sorted(remake)


def grid_arguments(ap, profiles: dict, default: str):
    """The options every resumable grid benchmark takes (profile, work dir, output, workers)."""
    ap.add_argument("--profile", choices=sorted(profiles), default=default)
    ap.add_argument("--work", default=None, help="run directory (per-run records: rerunning continues)")
    ap.add_argument("--out", default=None, help="result JSON (a PNG beside it)")
    ap.add_argument("--workers", type=int, default=None, help="parallel runs (default: the profile's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    return ap


def save_grid_result(result: dict, out: str, plot) -> None:
    """``result`` as JSON at ``out``, then ``plot(result, png_path)`` beside it (a failing plot
    loses no result)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    _write_json(out, result, indent=1)
    plot(result, out[:-5] + ".png" if out.endswith(".json") else out + ".png")


def write_report(report: dict, out: str) -> str:
    """``report`` as indented JSON at ``out`` (its folder made), said on stdout."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {out}")
    return out


_LOCKS = {}  # rec_dir -> the open lock file this process holds


def lock_records(rec_dir: str) -> None:
    """Hold rec_dir/.lock for the rest of this process (once per process): two processes writing
    one grid's records and files would race; the second one stops with what to do."""
    key = os.path.realpath(rec_dir)
    if key in _LOCKS:
        return
    os.makedirs(rec_dir, exist_ok=True)
    fh = open(os.path.join(rec_dir, ".lock"), "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise SystemExit(f"another process is running jobs of {rec_dir}: run slices of one --work one after "
                         "another (or give this one its own --work)") from None
    _LOCKS[key] = fh


def check_grid(rec_dir: str, signature: dict, write: bool) -> None:
    """A --work holds one grid: rec_dir/grid.json keeps the ``signature`` (benchmark, profile
    configuration, configurations) of the first run; a different one stops with what to do.
    ``write``: record the signature when there is none yet; call it with ``write=False`` first and
    with ``write=True`` once the run's other checks have passed (an analysis only reads)."""
    path = os.path.join(rec_dir, "grid.json")
    sig = json.loads(json.dumps(signature))  # as it reads back
    try:
        with open(path, encoding="utf-8") as f:
            had = json.load(f)
    except FileNotFoundError:
        if write:
            os.makedirs(rec_dir, exist_ok=True)
            _write_json(path, sig, indent=1)
        return
    except ValueError as e:
        raise SystemExit(f"{path} cannot be read ({e}): delete it only if the records beside it are this grid's") from None
    if had != sig:
        diff = sorted(k for k in sig if not isinstance(had, dict) or had.get(k) != sig.get(k))
        raise SystemExit(f"{rec_dir} holds the records of another grid ({path} differs in {diff}): use a new --work "
                         "for this one (delete grid.json only if the records beside it were made by this grid)")


def _start_worker(parent: int, initializer, initargs) -> None:
    """A pool worker's start: it is killed with the process that runs the grid, however that ends
    (SIGKILL: a trainer would answer SIGTERM with a checkpoint and the worker take the next queued
    job), so no orphan goes on writing a run's files while a rerun makes them again."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (ImportError, OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def _call_if_parent(parent: int, fn, job, *args):
    """``fn(job, *args)`` in a pool worker, unless the grid's process has ended (a job queued
    before it ended)."""
    if os.getppid() != parent:
        os._exit(1)
    return fn(job, *args)


def run_jobs(jobs: list, fn, fn_args: tuple, rec_dir: str, workers: int, initializer=None, initargs=(), log=print) -> dict:
    """Run ``fn(job, *fn_args) -> record`` for every job (dicts with ``key``, ``deps``: keys that
    must finish first, ``cost``: larger runs first) on a spawn process pool. Each record is
    written atomically to rec_dir/KEY.json as it finishes, and a job whose record is there is
    skipped, so an interrupted benchmark continues where it stopped; workers end with this process.
    A failure cancels the queue, keeps what was running when it finishes, and raises. One process at a time (``lock_records``). Returns {key: record}; a record whose own
    "key" differs is also indexed by it."""
    lock_records(rec_dir)
    done, records = set(), {}

    def keep(j, rec):
        records[j["key"]] = rec
        if isinstance(rec, dict) and rec.get("key", j["key"]) != j["key"]:
            records[rec["key"]] = rec

    for j in jobs:
        try:
            with open(os.path.join(rec_dir, j["key"] + ".json")) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):  # missing, or cut short: run it (again)
            continue
        done.add(j["key"])
        keep(j, rec)
    todo = [j for j in jobs if j["key"] not in done]
    log(f"[bench] {len(jobs)} jobs, {len(done)} cached, {len(todo)} to run on {workers} worker(s)")
    t0, submitted, running = time.time(), set(), {}
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                                initargs=(os.getpid(), initializer, initargs)) as ex:
        while len(done) < len(jobs):
            ready = [j for j in todo if j["key"] not in submitted and all(d in done for d in j["deps"])]
            for j in sorted(ready, key=lambda j: -j.get("cost", 1)):
                submitted.add(j["key"])
                running[ex.submit(_call_if_parent, os.getpid(), fn, j, *fn_args)] = j
            if not running:
                raise RuntimeError("unsatisfiable job dependencies")
            fin, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            failed = []
            for fut in fin:
                j = running.pop(fut)
                if fut.exception() is not None:
                    failed.append((j, fut.exception()))
                    continue
                rec = fut.result()
                _write_json(os.path.join(rec_dir, j["key"] + ".json"), rec)
                keep(j, rec)
                done.add(j["key"])
                log(f"[bench] {len(done)}/{len(jobs)} {j['key']} ({time.time() - t0:.0f}s)")
            if failed:
                ex.shutdown(wait=True, cancel_futures=True)
                for fut, j in running.items():  # runs that finished meanwhile are kept
                    if not fut.cancelled() and fut.exception() is None:
                        _write_json(os.path.join(rec_dir, j["key"] + ".json"), fut.result())
                        log(f"[bench] {j['key']} kept ({time.time() - t0:.0f}s)")
                j, e = failed[0]
                raise RuntimeError(f"{len(failed)} job(s) failed, first {j['key']}: {e!r}; rerun to continue") from e
    return records
