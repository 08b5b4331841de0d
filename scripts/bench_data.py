"""How the data path scales with the data set: time to the first step, memory, data time per step.

    python scripts/bench_data.py N [N ...] [--work runs/bench_data] [--pool 200] [--steps 2]
        [--seed 0] [--num-proc K] [--out results.json]
    python scripts/bench_data.py 3000                # quick: 3,000 records against the baseline
    python scripts/bench_data.py 10000 100000 665000 --out data.json   # LLaVA-665K's size

Users train on LLaVA-665K (llava_v1_5_mix665k.json, 936 MB). Before the first step the
trainer reads the whole file, checks every record and the file of every image, tokenizes the
records and keeps them as an Arrow table; all of that grows with the number of records, while
a training step should not. This measures it from outside, through the command line,
metrics.jsonl and /proc only, so the same script measures the data path before and after a
rewrite.

Data: for each N, WORK/data/mix-N-seedS-poolP.json, N records shaped like LLaVA-665K
(llava_tune/demo/mix.py: 1-8 turns, a third text-only, answers of 1 to 200 words), written
once, streaming (record by record, chunks of CHUNK records from their own seeds, ids
renumbered so they stay unique), and reused: 665,000 records are ~860 MB, written in about
2 minutes on this project's 2-core CPU (measured: 50,000 in 9.4 s, at ~70 MB RSS). Their images come from a pool of --pool
images (WORK/pool-P-seedS/, IMAGE_SIDE px long side): record i, when it has an image, shows
pool image i % P. So the image files stay few while every record still names one, as a
record of LLaVA-665K does; with a pool of 200 the files are in the page cache, which leaves
out the disk (a real image folder on a cold disk makes the checks slower than measured here).

Models: the demo's tiny InternLM2-architecture LM (its tokenizer learned from the
BASELINE-record file) and tiny ViT (llava_tune/demo/make.py), built once under WORK/models-seedS.
The LM's conversion to the Llama layout is done then too (WORK/llm-cache), so no run pays it.

Runs: `python -m llava_tune train configs/demo/finetune.yaml` with the demo models, no
quantization (4-bit costs time and has nothing to do with the data), no init_from,
data.max_length 1024, train.batch_size 8, --steps optimizer steps, a metrics row every step,
data.cache_dir WORK/cache-N (and data.num_proc K with --num-proc). Each run is its own
process. Twice per N: cold (WORK/cache-N deleted first: everything is read and tokenized),
then warm (the cache of the cold run kept: what a second run on the same file costs). A
BASELINE-record run comes first, whether or not BASELINE is among the Ns: it holds what a run
needs besides its data (interpreter, torch, models), and "RSS added" is measured against it.

Per run:
- 1st step s: from starting the process (Popen) until metrics.jsonl has its first row, i.e.
  start-up, the data set's preparation and the first step (polled every POLL s);
- ready s: until metrics.jsonl exists. The trainer creates it when its setup is done (model,
  data set, loader, optimizer), just before the first batch: the start without the first
  step, whose own time depends on which samples the shuffle drew (at max_length 1024 a batch
  of long text-only records takes several times a short one's);
- wall s: until the process has exited;
- peak MB: the process's own peak resident set (VmHWM of /proc/PID/status, the last one seen
  while it ran; MB = 2**20 bytes). Also the largest RssAnon (the heap: Python objects,
  in-memory tables) and RssFile (file pages mapped into the process, e.g. a memory-mapped
  Arrow file: page cache, shared, the kernel may drop it) seen, and the largest sum of VmRSS
  over the process and its children (tree_peak_rss_mb, for worker processes; shared pages
  count once per process there, so it is an upper bound);
- setup MB: VmHWM seen last before metrics.jsonl appeared (with RssAnon and RssFile then):
  the peak of the start, data included, without the steps'. The steps' own memory depends on
  the batches drawn, which differ between data sets (measured at N=1000-3000: whole-run
  peaks 1,780-2,880 MB over setup peaks of ~1,300-1,420 MB, by the batches' lengths), so the
  whole-run peaks of two Ns differ by hundreds of MB for nothing;
- added: setup MB minus the baseline run's (cold against cold, warm against warm): what the
  data set's size costs in memory. The whole-run difference is kept too (rss_added_mb);
- data s/step: the trainer's wait for batches per step (metrics.jsonl's data_seconds: reading
  the table's rows, decoding the images, collating), the mean over the steps after the first
  (the first includes the loader's start) of both runs of that N. With --steps 2 that is
  one step per run: give more steps for a steadier number.

"ready" relies on the trainer opening metrics.jsonl at the end of its setup (this checkout
does); a trainer that creates it later only moves "ready" towards "1st step".

Targets (issue 21), printed as met/MISSED: for N = 665,000, cold start to the first step <=
600 s, warm <= 60 s, data RSS added <= 2,048 MB (setup peaks, and the whole-run peaks as a
second line); and the data time per step at the largest N within 25% (or 0.05 s) of the
smallest N's (the baseline's when it is the smallest): a step must not slow down with the
data set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo" / "finetune.yaml"
BASELINE = 1000
"""Records of the baseline run (and of the file the tokenizer learns from)."""
CHUNK = 10_000
"""Records generated at a time (mix_records holds its records in memory)."""
IMAGE_SIDE = 336
"""Long side of the pool's images in pixels (the demo's tower sees them at 64 px)."""
MAX_LENGTH = 1024
BATCH_SIZE = 8
POLL = 0.1
"""Seconds between looks at /proc and metrics.jsonl."""
LLAVA_665K = 665_000
TARGETS = {"cold_first_step_s": 600.0, "warm_first_step_s": 60.0, "rss_added_mb": 2048.0,
           "data_time_ratio": 0.25, "data_time_abs_s": 0.05}


# --------------------------------------------------------------------------- data


def chunk_seed(seed: int, chunk: int) -> int:
    """The mix seed of chunk `chunk`: distinct for every (seed, chunk) below a million chunks,
    and chunk 0 of seed S is mix_records' own seed S."""
    return seed * 1_000_000 + chunk


def pool_records(n: int, seed: int, pool: int) -> Iterator[dict[str, Any]]:
    """`n` LLaVA-665K-like records, CHUNK at a time: ids mix-{i:07d}-{kind}, and record i,
    when it has an image, names pool image i % pool ("{k:06d}.jpg")."""
    from llava_tune.demo import mix

    index = 0
    for chunk in range((n + CHUNK - 1) // CHUNK):
        for record in mix.mix_records(min(CHUNK, n - index), chunk_seed(seed, chunk)):
            kind = record["id"].rsplit("-", 1)[1]
            record["id"] = f"mix-{index:07d}-{kind}"
            if "image" in record:
                record["image"] = f"{index % pool:06d}.jpg"
            yield record
            index += 1


def write_records(path: Path, records: Iterator[dict[str, Any]]) -> int:
    """Write a JSON list one record at a time (never the whole text in memory), to a
    temporary file first: `path` appears only once complete. Returns the records written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", buffering=1 << 20) as out:
            out.write("[\n")
            for record in records:
                if count:
                    out.write(",\n")
                out.write(json.dumps(record, ensure_ascii=False))
                count += 1
            out.write("\n]\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def data_file(work: Path, n: int, seed: int, pool: int) -> Path:
    return work / "data" / f"mix-{n}-seed{seed}-pool{pool}.json"


def ensure_data(work: Path, n: int, seed: int, pool: int) -> tuple[Path, float | None]:
    """The N-record file, written now unless present; (path, seconds it took or None)."""
    path = data_file(work, n, seed, pool)
    if path.is_file():
        return path, None
    start = time.perf_counter()
    write_records(path, pool_records(n, seed, pool))
    return path, time.perf_counter() - start


def ensure_pool(work: Path, pool: int, seed: int) -> Path:
    """`pool` images {k:06d}.jpg (mix.draw_image: shapes on a background, varied aspect
    ratios), written once."""
    from llava_tune.demo import mix

    folder = work / f"pool-{pool}-seed{seed}"
    marker = folder / ".complete"
    if marker.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"bench-data-pool-{seed}")
    for k in range(pool):
        mix.draw_image(rng, IMAGE_SIDE).save(folder / f"{k:06d}.jpg", format="JPEG", quality=90)
    marker.touch()
    return folder


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Models:
    llm: Path
    vision_config: Path
    vision_weights: Path
    llm_cache: Path
    """LLAVA_TUNE_CACHE of every run: the LM's Llama-layout conversion, made here once."""


def ensure_models(work: Path, tokenizer_data: Path, seed: int) -> Models:
    """The demo's LM (tokenizer learned from `tokenizer_data`) and tower, built once, and the
    LM's conversion cached, so that no measured run pays for it."""
    home = work / f"models-seed{seed}"
    models = Models(llm=home / "lm", vision_config=home / "vision" / "demo-vit.json",
                    vision_weights=home / "vision" / "demo-vit.safetensors",
                    llm_cache=work / "llm-cache")
    if not (home / ".complete").is_file():
        from llava_tune.demo import make

        shutil.rmtree(home, ignore_errors=True)
        make.make_lm(models.llm, [tokenizer_data], seed)
        make.make_vision(home / "vision", seed)
        shutil.rmtree(models.llm_cache, ignore_errors=True)
        (home / ".complete").touch()
    if not (models.llm_cache / "internlm2-as-llama").is_dir():
        _convert_llm(models)
    return models


def _convert_llm(models: Models) -> None:
    saved = os.environ.get("LLAVA_TUNE_CACHE")
    os.environ["LLAVA_TUNE_CACHE"] = str(models.llm_cache)
    try:
        from llava_tune.assembly.llm import converted_internlm2_dir

        converted_internlm2_dir(models.llm)
    finally:
        if saved is None:
            os.environ.pop("LLAVA_TUNE_CACHE")
        else:
            os.environ["LLAVA_TUNE_CACHE"] = saved


# --------------------------------------------------------------------------- one run


@dataclass
class Watch:
    """What polling a running process saw."""

    ready_s: float | None = None
    """When metrics.jsonl appeared: the trainer opens it once its setup is done (models,
    data set, loader, optimizer), right before the first batch."""
    setup_rss_mb: float | None = None
    """VmHWM seen last before metrics.jsonl appeared: the setup's peak, without the steps'."""
    setup_anon_mb: float | None = None
    setup_file_mb: float | None = None
    first_step_s: float | None = None
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    """The last VmHWM seen."""
    peak_anon_mb: float = 0.0
    peak_file_mb: float = 0.0
    tree_peak_rss_mb: float = 0.0
    samples: int = 0


def proc_status(pid: int) -> dict[str, float]:
    """The kB fields of /proc/PID/status in MB ({} once the process is gone)."""
    fields: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[key] = int(parts[0]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return fields


def descendants(pid: int) -> list[int]:
    """The process's children, their children, and so on (as /proc lists them now)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            found += children
            todo += children
    return found


def has_row(metrics: Path) -> bool:
    """Whether metrics.jsonl holds a complete line."""
    try:
        if metrics.stat().st_size == 0:
            return False
        with open(metrics, "rb") as f:
            return b"\n" in f.read(1 << 16)
    except FileNotFoundError:
        return False


def watch(proc: subprocess.Popen, start: float, metrics: Path) -> Watch:
    """Poll the process every POLL s until it exits: its memory, and when metrics.jsonl got
    its first row (seconds since `start`)."""
    seen = Watch()
    while True:
        status = proc_status(proc.pid)
        if "VmHWM" in status:  # absent once the process is a zombie
            seen.peak_rss_mb = status["VmHWM"]
            seen.peak_anon_mb = max(seen.peak_anon_mb, status.get("RssAnon", 0.0))
            seen.peak_file_mb = max(seen.peak_file_mb, status.get("RssFile", 0.0))
            tree = status.get("VmRSS", 0.0) + sum(
                proc_status(child).get("VmRSS", 0.0) for child in descendants(proc.pid))
            seen.tree_peak_rss_mb = max(seen.tree_peak_rss_mb, tree)
            seen.samples += 1
        if seen.ready_s is None and metrics.exists():
            # Status was read before this look: VmHWM then is the setup's, not a step's.
            seen.ready_s = time.perf_counter() - start
            seen.setup_rss_mb = seen.peak_rss_mb
            seen.setup_anon_mb, seen.setup_file_mb = seen.peak_anon_mb, seen.peak_file_mb
        if seen.first_step_s is None and has_row(metrics):
            seen.first_step_s = time.perf_counter() - start
        if proc.poll() is not None:
            break
        time.sleep(POLL)
    seen.wall_s = time.perf_counter() - start
    if seen.first_step_s is None and has_row(metrics):
        seen.first_step_s = seen.wall_s
    return seen


def train_command(models: Models, data: Path, images: Path, cache: Path, run_dir: Path,
                  steps: int, num_proc: int | None) -> list[str]:
    overrides = [f"model.llm={models.llm}", f"model.vision.config_file={models.vision_config}",
                 f"model.vision.pretrained={models.vision_weights}", "model.quantization=null",
                 "init_from=null", f"data.train={data}", f"data.image_folder={images}",
                 f"data.max_length={MAX_LENGTH}", f"data.cache_dir={cache}",
                 f"train.max_steps={steps}", "train.log_every=1", f"train.batch_size={BATCH_SIZE}",
                 f"run_dir={run_dir}"]
    if num_proc is not None:
        overrides.append(f"data.num_proc={num_proc}")
    return [sys.executable, "-m", "llava_tune", "train", str(CONFIG), *overrides, "--overwrite"]


def run_env(models: Models) -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (so this checkout's llava_tune
    runs) and the models' LLAVA_TUNE_CACHE; OMP_NUM_THREADS and the rest as they are."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "LLAVA_TUNE_CACHE": str(models.llm_cache)}


def log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def data_seconds(metrics: Path) -> list[float]:
    """metrics.jsonl's data_seconds, one per logged step (log_every=1)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if rows and "data_seconds" not in rows[0]:
        raise RuntimeError(f"{metrics} has no data_seconds: this checkout's trainer predates them")
    return [row["data_seconds"] for row in rows]


def run_once(name: str, command: list[str], env: dict[str, str], run_dir: Path,
             log: Path) -> dict[str, Any]:
    """One training process, watched; raises with the log's tail when it fails."""
    shutil.rmtree(run_dir, ignore_errors=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        seen = watch(proc, start, metrics)
    if proc.returncode != 0 or seen.first_step_s is None:
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); last lines of {log}:\n"
                           f"{log_tail(log)}")
    steps = data_seconds(metrics)
    later = steps[1:]
    return {**{k: v if v is None else round(v, 3) for k, v in asdict(seen).items()
               if k != "samples"},
            "polls": seen.samples, "data_seconds": steps,
            "data_s_per_step": round(sum(later) / len(later), 4) if later else None,
            "run_dir": str(run_dir), "log": str(log)}


# --------------------------------------------------------------------------- one N


@dataclass
class Row:
    n: int
    file: str
    json_mb: float
    generate_s: float | None
    cold: dict[str, Any] = field(default_factory=dict)
    warm: dict[str, Any] = field(default_factory=dict)
    data_s_per_step: float | None = None
    """Mean data_seconds over the steps after the first, of both runs."""


def bench_n(n: int, work: Path, images: Path, models: Models, args: argparse.Namespace,
            log=print) -> Row:
    """Data for N (written if new), then the cold and the warm run."""
    data, generate_s = ensure_data(work, n, args.seed, args.pool)
    if generate_s is not None:
        log(f"[N={n}] wrote {data.name} in {generate_s:.1f} s")
    row = Row(n=n, file=str(data), json_mb=round(data.stat().st_size / 2**20, 2),
              generate_s=None if generate_s is None else round(generate_s, 2))
    cache = work / f"cache-{n}"
    shutil.rmtree(cache, ignore_errors=True)
    for phase in ("cold", "warm"):
        run_dir = work / "runs" / f"{n}-{phase}"
        command = train_command(models, data, images, cache, run_dir, args.steps, args.num_proc)
        result = run_once(f"{n}-{phase}", command, run_env(models), run_dir,
                          work / "logs" / f"{n}-{phase}.log")
        setattr(row, phase, result)
        log(f"[N={n} {phase}] ready {_fmt(result['ready_s'], '.1f')} s (setup peak "
            f"{_fmt(result['setup_rss_mb'], '.0f')} MB), first step {result['first_step_s']:.1f} s, "
            f"wall {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB (anon "
            f"{result['peak_anon_mb']:.0f}, file {result['peak_file_mb']:.0f}), data "
            f"{_fmt(result['data_s_per_step'], '.4f')} s/step")
    later = row.cold["data_seconds"][1:] + row.warm["data_seconds"][1:]
    row.data_s_per_step = round(sum(later) / len(later), 4) if later else None
    return row


def add_rss(rows: list[Row], baseline: Row) -> None:
    """Against the baseline's run of the same phase: rss_added_mb (whole-run peaks) and
    setup_rss_added_mb (setup peaks: the data's memory without the steps')."""
    for row in rows:
        for phase in ("cold", "warm"):
            run, base = getattr(row, phase), getattr(baseline, phase)
            run["rss_added_mb"] = round(run["peak_rss_mb"] - base["peak_rss_mb"], 1)
            run["setup_rss_added_mb"] = (
                None if None in (run["setup_rss_mb"], base["setup_rss_mb"])
                else round(run["setup_rss_mb"] - base["setup_rss_mb"], 1))


# --------------------------------------------------------------------------- targets, printing


def check_targets(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's targets that these rows can answer: N=665,000's start and memory, and the
    data time per step of the largest N against the smallest's."""
    checks = []
    by_n = {row.n: row for row in rows}
    big = by_n.get(LLAVA_665K)
    if big is not None:
        for phase in ("cold", "warm"):
            checks.append(_check(f"{phase} start to the first step, N=665000 (s)",
                                 getattr(big, phase)["first_step_s"],
                                 TARGETS[f"{phase}_first_step_s"]))
        for key, what in (("setup_rss_added_mb", "setup peaks"),
                          ("rss_added_mb", "whole-run peaks, with the steps' own memory")):
            values = [getattr(big, phase)[key] for phase in ("cold", "warm")]
            if None not in values:
                checks.append(_check(f"data RSS added, N=665000 (MB, {what}; the larger of "
                                     "cold and warm)", max(values), TARGETS["rss_added_mb"]))
    small, large = by_n[min(by_n)], by_n[max(by_n)]
    if small is not large and None not in (small.data_s_per_step, large.data_s_per_step):
        limit = small.data_s_per_step + max(TARGETS["data_time_ratio"] * small.data_s_per_step,
                                            TARGETS["data_time_abs_s"])
        checks.append(_check(f"data s/step at N={large.n} within 25% (or 0.05 s) of "
                             f"N={small.n}'s {small.data_s_per_step:.4f}",
                             large.data_s_per_step, round(limit, 4)))
    return checks


def _check(name: str, value: float, limit: float) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit, "met": value <= limit}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


PHASE_COLUMNS = (("1st step s", "first_step_s", ".1f"), ("ready s", "ready_s", ".1f"),
                 ("peak MB", "peak_rss_mb", ".0f"), ("setup MB", "setup_rss_mb", ".0f"),
                 ("added", "setup_rss_added_mb", ".0f"))


def print_table(rows: list[Row], baseline_n: int) -> None:
    phase_head = " ".join(f"{title:>10s}" for title, _, _ in PHASE_COLUMNS)
    width = len(phase_head)
    print(f"{'':17s} | {'cold':^{width}s} | {'warm':^{width}s} |")
    head = f"{'N':>8s} {'JSON MB':>8s} | {phase_head} | {phase_head} | {'data s/step':>11s}"
    print(head)
    print("-" * len(head))
    for row in rows:
        cells = [" ".join(f"{_fmt(run[key], spec):>10s}" for _, key, spec in PHASE_COLUMNS)
                 for run in (row.cold, row.warm)]
        mark = " (baseline)" if row.n == baseline_n else ""
        print(f"{row.n:8d} {row.json_mb:8.1f} | {cells[0]} | {cells[1]} | "
              f"{_fmt(row.data_s_per_step, '11.4f')}{mark}")
    print("1st step s: start to metrics.jsonl's first row; ready s: to its creation (setup done); "
          "peak MB: VmHWM of the run;\nsetup MB: VmHWM when ready; added: setup MB minus the "
          f"baseline's (N={baseline_n}); data s/step: mean data_seconds after step 1, both runs")


def print_targets(checks: list[dict[str, Any]]) -> None:
    for c in checks:
        print(f"{'met' if c['met'] else 'MISSED':6s} {c['target']}: {c['value']} "
              f"(target <= {c['limit']})")


# --------------------------------------------------------------------------- command line


SHARE_WORKER = """
import json, sys
from llava_tune.assembly.llm import load_tokenizer
from llava_tune.data.datasets import ConversationDataset
from llava_tune.data.image import ImageProcessor
from llava_tune.data.template import INTERNLM2_CHAT, add_image_token
from llava_tune.models.anyres import ImageLayout

def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}

llm, data, images, cache = sys.argv[1:5]
tokenizer = load_tokenizer(llm)
add_image_token(tokenizer)
before = memory()
dataset = ConversationDataset(data, tokenizer, INTERNLM2_CHAT, int(sys.argv[5]),
                              image_folder=images, image_processor=ImageProcessor(64, [0.5] * 3,
                              [0.5] * 3), layout=ImageLayout(64, 4), cache_dir=cache)
lengths = dataset.lengths()  # what a length-grouped sampler reads
after = memory()
print(json.dumps({"prepared_here": dataset.prepared_here, "samples": len(dataset),
                  **{key + "_mb": round(after[key] - before[key], 1) for key in after}}))
"""
"""Builds one data set as a process of a launch does (`--share`), and reports the memory the
data set added to it: RssAnon (its own heap) and RssFile (mapped files, shared)."""


def share_probe(n: int, work: Path, images: Path, models: Models, seed: int, pool: int,
                log) -> list[dict[str, Any]]:
    """Two processes start on the same cold cache at once, as two ranks of a launch: one
    prepares the data, the other waits and maps its files. Their data's memory, each."""
    data, _ = ensure_data(work, n, seed, pool)
    cache = work / f"cache-share-{n}"
    shutil.rmtree(cache, ignore_errors=True)
    log(f"[N={n} share] two processes on one cold cache ...")
    env = {**run_env(models), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SHARE_WORKER, str(models.llm), str(data),
                               str(images), str(cache), str(MAX_LENGTH)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"share probe failed (exit {proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    results.sort(key=lambda r: not r["prepared_here"])
    for name, r in zip(("first (prepared)", "second (mapped)"), results, strict=True):
        log(f"[N={n} share] {name}: data RssAnon +{r['RssAnon_mb']} MB, "
            f"RssFile +{r['RssFile_mb']} MB, {r['samples']} samples")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="+", metavar="N", help="records in a data set")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_data",
                        help="data, models, caches, runs and logs (data and models reused)")
    parser.add_argument("--pool", type=int, default=200, help="distinct image files")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=0, help="data and model seed")
    parser.add_argument("--num-proc", type=int, metavar="K",
                        help="pass data.num_proc=K to every run (only when given)")
    parser.add_argument("--out", type=Path, help="write every number and the settings as JSON")
    parser.add_argument("--share", action="store_true",
                        help="also start two processes on one cold cache of the largest N: "
                        "the data memory of the one that prepares and of the one that maps")
    args = parser.parse_args(argv)
    if min(args.n) < 1 or args.pool < 1 or args.steps < 1:
        parser.error("N, --pool and --steps must be >= 1")
    if args.num_proc is not None and args.num_proc < 1:
        parser.error("--num-proc must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    ns = sorted(set(args.n) - {BASELINE})
    images = ensure_pool(work, args.pool, args.seed)
    sample, _ = ensure_data(work, BASELINE, args.seed, args.pool)
    log(f"models under {work} ...")
    models = ensure_models(work, sample, args.seed)
    started = time.perf_counter()
    rows = [bench_n(n, work, images, models, args, log) for n in [BASELINE, *ns]]
    baseline = rows[0]
    add_rss(rows, baseline)
    checks = check_targets(rows)
    share = share_probe(max(args.n), work, images, models, args.seed, args.pool, log) \
        if args.share else None
    if share is not None:
        first, second = share
        ratio = second["RssAnon_mb"] / max(first["RssAnon_mb"], 1.0)
        checks.append({**_check("second process's data RssAnon / the first's", ratio, 0.10)})
    print(f"\nbench_data: {args.steps} steps of batch {BATCH_SIZE}, max_length {MAX_LENGTH}, "
          f"pool of {args.pool} images, {os.cpu_count()} CPUs"
          f"{f', data.num_proc={args.num_proc}' if args.num_proc else ''}; "
          f"RSS added against N={BASELINE}")
    print_table(rows, BASELINE)
    print_targets(checks)
    if args.out is not None:
        result = {"settings": settings(args, work), "baseline_n": BASELINE,
                  "rows": [asdict(row) for row in rows], "targets": checks, "share": share,
                  "seconds": round(time.perf_counter() - started, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"results in {args.out}")
    return 0


def settings(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return {"ns": sorted(set(args.n)), "work": str(work), "pool": args.pool, "steps": args.steps,
            "seed": args.seed, "num_proc": args.num_proc, "batch_size": BATCH_SIZE,
            "max_length": MAX_LENGTH, "image_side": IMAGE_SIDE, "chunk": CHUNK, "poll_s": POLL,
            "config": str(CONFIG.relative_to(ROOT)), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


if __name__ == "__main__":
    sys.exit(main())
