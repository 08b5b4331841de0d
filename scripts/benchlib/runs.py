"""Running the two systems, each in its own process (alternating, --repeats of each): the
benchmark's measured runs, the profiles, and --check's first-step losses on one batch."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.data import ROOT, Setup, data_stats, environment, first_records
from benchlib.peer import peer_worker

CLI = Path(__file__).resolve().parents[1] / "bench_train.py"
"""The command line, which also starts the workers (--worker peer|profile-ours SPEC)."""


@dataclass
class Run:
    returncode: int
    peak_rss_mb: float
    seconds: float
    log: Path


def spawn(command: list[str], log: Path, work: Path) -> Run:
    """Run `command` in a fresh interpreter, output to `log`; its own peak RSS from wait4."""
    env = {**os.environ, "LLAVA_TUNE_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    # ru_maxrss is in KiB on Linux.
    return Run(proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start, log)


def _failed(what: str, run: Run) -> RuntimeError:
    tail = "\n".join(run.log.read_text(errors="replace").splitlines()[-30:])
    return RuntimeError(f"{what} failed (exit {run.returncode}); last lines of {run.log}:\n{tail}")


def ours_overrides(setup: Setup, run_dir: Path, steps: int, batch_size: int, log_every: int,
                   extra: list[str], data: Path | None = None) -> list[str]:
    items = setup.overrides() + [f"init_from={setup.start}", f"run_dir={run_dir}",
                                 f"train.max_steps={steps}", f"train.batch_size={batch_size}",
                                 f"train.log_every={log_every}"]
    if data is not None:
        items.append(f"data.train={data}")
    return items + list(extra)


def run_ours(setup: Setup, name: str, steps: int, warmup: int, batch_size: int,
             extra: list[str]) -> dict[str, Any]:
    """One `llava-tune train` run; steady state from its metrics.jsonl windows after `warmup`."""
    run_dir = setup.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    # Logging every `warmup` steps makes the first window exactly the warm-up.
    overrides = ours_overrides(setup, run_dir, steps, batch_size, warmup, extra)
    run = spawn([sys.executable, "-m", "llava_tune", "train", str(setup.config), *overrides],
                setup.work / "logs" / f"{name}.log", setup.work)
    if run.returncode != 0:
        raise _failed(f"ours ({name})", run)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r["step"] > warmup]
    if not steady or "tokens" not in steady[0]:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no steady-state window with token counts")
    return {"tokens": sum(r["tokens"] for r in steady), "seconds": sum(r["seconds"] for r in steady),
            "steps": steps - warmup,
            "peak_mb": rows[-1]["memory_mb"],  # the trainer's own peak (module docstring)
            "process_peak_mb": round(run.peak_rss_mb, 1),
            "process_s": round(run.seconds, 2)}


def run_peer(setup: Setup, name: str, steps: int, warmup: int, batch_size: int, mode: str = "bench",
             data: Path | None = None, in_process: bool = False) -> dict[str, Any]:
    """One peer run in its own process (bench_train.py --worker peer), or in this one when
    nothing is measured (`in_process`, for --check)."""
    out_dir = setup.work / "runs" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    overrides = setup.overrides() + [f"train.batch_size={batch_size}"]
    if data is not None:
        overrides.append(f"data.train={data}")
    spec = {"config": str(setup.config), "overrides": overrides, "export": str(setup.export),
            "llm": str(setup.llm), "output_dir": str(out_dir), "steps": steps, "warmup": warmup,
            "mode": mode, "result": str(out_dir / "result.json"),
            "sampling": setup.peer_sampling}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    if in_process:
        assert mode != "bench", "a measured run needs its own process"
        with environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")):
            peer_worker(spec)
        return json.loads((out_dir / "result.json").read_text())
    run = spawn([sys.executable, str(CLI), "--worker", "peer",
                 str(out_dir / "spec.json")], setup.work / "logs" / f"{name}.log", setup.work)
    if run.returncode != 0:
        raise _failed(f"peer ({name})", run)
    result = json.loads((out_dir / "result.json").read_text())
    if mode == "bench":
        result["peak_mb"] = result["peak_gpu_mb"] if gpu_available() else result["peak_rss_mb"]
        result["process_peak_mb"] = round(run.peak_rss_mb, 1)
        result["process_s"] = round(run.seconds, 2)
    return result


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_profiles(setup: Setup, warmup: int, active: int, batch_size: int, extra: list[str]) -> dict:
    steps = warmup + active
    ours_dir = setup.work / "runs" / "profile-ours"
    shutil.rmtree(ours_dir, ignore_errors=True)
    ours_dir.mkdir(parents=True)
    spec = {"config": str(setup.config), "warmup": warmup, "steps": steps,
            "overrides": ours_overrides(setup, ours_dir / "run", steps, batch_size, warmup, extra),
            "result": str(ours_dir / "result.json")}
    (ours_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    run = spawn([sys.executable, str(CLI), "--worker", "profile-ours",
                 str(ours_dir / "spec.json")], setup.work / "logs" / "profile-ours.log", setup.work)
    if run.returncode != 0:
        raise _failed("ours (profile)", run)
    ours = json.loads((ours_dir / "result.json").read_text())["profile"]
    rows = [json.loads(line) for line in (ours_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    ours["tokens_per_step"] = sum(r["tokens"] for r in rows if r["step"] > warmup) / active
    peer = run_peer(setup, "profile-peer", steps, warmup, batch_size, mode="profile")["profile"]
    return {"ours": ours, "peer": peer}



def check_identity(setup: Setup, batch_size: int, extra: list[str] = (),
                   in_process: bool = False) -> dict[str, Any]:
    """First-step loss of both systems on one identical batch: the first `batch_size`
    records (a file of exactly one batch, so any order gives the same batch). Nothing is
    timed, so `in_process` may run both in this interpreter (faster; the tests do)."""
    data = first_records(setup.data, batch_size, setup.work / "check" / "first-batch.json")
    ours, ours_trainable = run_ours_check(setup, data, batch_size, list(extra), in_process)
    peer = run_peer(setup, "check-peer", 1, 1, batch_size, mode="check", data=data,
                    in_process=in_process)
    return {"ours": ours, "peer": peer["losses"][0], "abs_diff": abs(ours - peer["losses"][0]),
            "trainable": {"ours": ours_trainable, "peer": peer["trainable"]}}


def run_ours_check(setup: Setup, data: Path, batch_size: int, extra: list[str],
                   in_process: bool = False) -> tuple[float, int | None]:
    """Ours' first-step loss, and its trainable parameter count as its log states it (None
    when the log's wording changed)."""
    run_dir = setup.work / "runs" / "check-ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = ours_overrides(setup, run_dir, 1, batch_size, 1, extra, data=data)
    log = setup.work / "logs" / "check-ours.log"
    if in_process:
        import io

        from llava_tune.cli import main as cli

        captured = io.StringIO()
        with environment(LLAVA_TUNE_CACHE=str(setup.work / "cache")), \
                contextlib.redirect_stderr(captured):
            code = cli(["train", str(setup.config), *overrides])
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(captured.getvalue())
        if code != 0:
            raise RuntimeError(f"ours (check) failed (exit {code}):\n{captured.getvalue()[-3000:]}")
    else:
        run = spawn([sys.executable, "-m", "llava_tune", "train", str(setup.config), *overrides],
                    log, setup.work)
        if run.returncode != 0:
            raise _failed("ours (check)", run)
    counts = re.findall(r"^\s+\w+\s+([\d,]+) trainable of", log.read_text(), re.MULTILINE)
    trainable = sum(int(c.replace(",", "")) for c in counts) if counts else None
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"], trainable


def _summary(tokens: int, seconds: float, mean_tokens: float) -> dict[str, float]:
    rate = tokens / seconds
    return {"tokens_per_s": rate, "samples_per_s": rate / mean_tokens}


def benchmark(setup: Setup, steps: int, warmup: int, batch_size: int, repeats: int,
              extra: list[str], log=print) -> dict[str, Any]:
    """Alternate ours/peer `repeats` times; medians of steady tokens/s, samples/s, peak MB."""
    stats = data_stats(setup)
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for i in range(1, repeats + 1):
        for system in ("ours", "peer"):
            log(f"[{system} {i}/{repeats}] {steps} steps ...")
            if system == "ours":
                r = run_ours(setup, f"ours-{i}", steps, warmup, batch_size, extra)
            else:
                r = run_peer(setup, f"peer-{i}", steps, warmup, batch_size)
            r.update(_summary(r["tokens"], r["seconds"], stats["mean_tokens"]))
            runs[system].append(r)
            log(f"[{system} {i}/{repeats}] {r['tokens_per_s']:.1f} real tokens/s, "
                f"peak {r['peak_mb']:.0f} MB")
    keys = ("tokens_per_s", "samples_per_s", "peak_mb")
    medians = {s: {k: statistics.median(r[k] for r in runs[s]) for k in keys} for s in runs}
    ratio = {k: medians["ours"][k] / medians["peer"][k] for k in keys}
    return {"data": stats, "ours": {"runs": runs["ours"], "median": medians["ours"]},
            "peer": {"runs": runs["peer"], "median": medians["peer"]}, "ours_over_peer": ratio}

