"""Every token weighs the same: batch 4, batch 2 x accumulation 2 and 2 processes x batch 2
train to the same weights; several processes on the CPU (torchrun + gloo) write one run dir,
one metrics.jsonl and one progress report, and resume after a kill."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import kill_launch
from safetensors.torch import load_file

from llava_tune.config import load_config
from llava_tune.constants import IGNORE_INDEX
from llava_tune.training import train

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
EXACT = ["train.log_every=1", "train.warmup_ratio=0", "train.max_steps=3", "data.max_length=256"]
WORDS = "a red circle blue square green star yellow triangle is the shape color".split()


@pytest.fixture(scope="module")
def multi_turn(tmp_path_factory) -> Path:
    """1-3 turns per record, answers of 1 to 30 words: micro-batches differ a lot in how many
    label tokens they hold, which is what a per-micro-batch mean gets wrong."""
    rng = random.Random(0)
    records = []
    for _ in range(32):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))},
                      {"role": "assistant",
                       "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))}]
        records.append({"messages": turns})
    path = tmp_path_factory.mktemp("multi") / "multi.json"
    path.write_text(json.dumps(records))
    return path


def sft_args(tiny_lm, data, run_dir, *extra) -> list[str]:
    return [f"model.llm={tiny_lm}", f"data.train={data}", f"run_dir={run_dir}", "data.pack=false",
            "train.lora.dropout=0", *EXACT, *extra]


def finetune_args(stage_overrides, run_dir, *extra) -> list[str]:
    return [*stage_overrides("finetune"), f"run_dir={run_dir}", "init_from=null",
            "data.max_length=64", "train.log_every=1", "train.warmup_ratio=0",
            "train.max_steps=3", *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("llm_adapter/adapter_model.safetensors", "projector/model.safetensors"):
        if (run_dir / part).is_file():
            out.update({f"{part}:{k}": v for k, v in load_file(run_dir / part).items()})
    return out


def column(run_dir: Path, key: str) -> list:
    """`key` of every line of the run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


def losses(run_dir: Path) -> list[float]:
    return column(run_dir, "loss")


def assert_same_weights(a: Path, b: Path, atol: float | None = None,
                        rtol: float | None = None) -> None:
    """Every weight within `atol`, or the whole difference within `rtol` of the weights' norm
    (the bug this guards against, a per-micro-batch mean, moved them by ~20%)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    if atol is not None:
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst < atol, f"{a.name} vs {b.name}: max weight difference {worst:.2e}"
    if rtol is not None:
        diff = sum((wa[k] - wb[k]).float().norm() ** 2 for k in wa) ** 0.5
        norm = sum(wa[k].float().norm() ** 2 for k in wa) ** 0.5
        assert diff / norm < rtol, f"{a.name} vs {b.name}: relative difference {diff / norm:.2e}"


def test_accumulation_weighs_every_token_alike(tmp_path, tiny_lm, multi_turn):
    big = train(load_config(DEMO / "sft.yaml", sft_args(tiny_lm, multi_turn, tmp_path / "b4",
                                                        "train.batch_size=4")))
    small = train(load_config(DEMO / "sft.yaml", sft_args(
        tiny_lm, multi_turn, tmp_path / "b2x2", "train.batch_size=2", "train.grad_accum=2")))
    assert big.steps == small.steps == 3
    assert_same_weights(big.run_dir, small.run_dir, atol=1e-5)
    # The logged loss is the same token-weighted mean too.
    assert losses(small.run_dir) == pytest.approx(losses(big.run_dir), abs=1e-5)
    # The data makes a per-micro-batch mean wrong: the two micro-batches of a step hold very
    # different numbers of label tokens.
    from llava_tune.assembly.model import load_run
    from llava_tune.data.collate import Collator
    from llava_tune.training.setup import build_dataset

    bundle = load_run(big.run_dir)
    dataset = build_dataset(bundle.config, bundle, str(multi_turn))
    counts = [int((dataset[i]["labels"][1:] != IGNORE_INDEX).sum()) for i in range(len(dataset))]
    assert max(counts) > 3 * min(counts)
    assert Collator(bundle.tokenizer.pad_token_id)([dataset[0]]).num_label_tokens == counts[0]


def test_accumulation_with_images_and_4bit(tmp_path, stage_overrides):
    """Projector + QLoRA on the 4-bit LLM: the same equivalence. Adam turns float noise in
    near-zero gradients into steps of up to lr, and the thread count changes that noise (one
    weight moved 5e-5 apart with 2 threads, none with 1), so the bound is on the whole."""
    config = DEMO / "finetune.yaml"
    big = train(load_config(config, finetune_args(stage_overrides, tmp_path / "b4",
                                                  "train.batch_size=4")))
    small = train(load_config(config, finetune_args(stage_overrides, tmp_path / "b2x2",
                                                    "train.batch_size=2", "train.grad_accum=2")))
    assert_same_weights(big.run_dir, small.run_dir, rtol=1e-5)
    assert losses(small.run_dir) == pytest.approx(losses(big.run_dir), abs=1e-5)


ONE_NODE = ["--standalone", "--nproc_per_node", "2"]
"""torchrun's arguments for one machine with two processes."""


def torchrun(args: list[str], env: dict, launch: list[str] = ONE_NODE,
             **kwargs) -> subprocess.Popen:
    """`torchrun LAUNCH -m llava_tune ...` on the CPU (gloo), in a process group of its own."""
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "llava_tune",
               "--quiet", *args]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args_per_node: list[list[str]], env: dict) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each, meeting as two machines would: c10d rendezvous
    at an endpoint (here the loopback), not --standalone. `args_per_node[i]`: agent i's
    `llava-tune` arguments (two real machines may differ in their local paths)."""
    endpoint = f"127.0.0.1:{free_port()}"
    launch = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
              "--rdzv-conf", "join_timeout=120", "--max-restarts", "0"]
    return [torchrun(args, env, launch) for args in args_per_node]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Wait for every launch (all killed if one outlives `timeout`); their stderr. Each must
    have succeeded."""
    errs = []
    try:
        for proc in procs:
            errs.append(proc.communicate(timeout=timeout)[1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), "\n---\n".join(e[-3000:] for e in errs)
    return errs


@pytest.fixture
def env(tmp_path) -> dict:
    # One thread per process: the two processes share the machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "LLAVA_TUNE_CACHE": os.environ["LLAVA_TUNE_CACHE"]}


def dpo_args(stage_overrides, pairs, init, run_dir, *extra) -> list[str]:
    """finetune_args for stage dpo from `init` (a finetune run) on the preference `pairs`."""
    return [*finetune_args(stage_overrides, run_dir), f"init_from={init}",
            f"data.train={pairs}", "data.eval=null", *extra]  # the last value of a key wins


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "finetune", "dpo"])
def test_two_processes_equal_one(tmp_path, tiny_lm, multi_turn, stage_overrides, env, stage,
                                 request):
    """Same losses and weights from 1 process x batch 4 and 2 processes x batch 2 (dpo: the
    reference precomputed by both processes, each a share of the pairs)."""
    if stage == "sft":
        config, args = DEMO / "sft.yaml", lambda run, b: sft_args(tiny_lm, multi_turn, run, b)
    elif stage == "finetune":
        config, args = DEMO / "finetune.yaml", lambda run, b: finetune_args(stage_overrides, run, b)
    else:
        from llava_tune.demo.pairs import pairs_of

        shapes = request.getfixturevalue("shapes_data")
        init = request.getfixturevalue("tiny_finetune_run")
        pairs = tmp_path / "pairs.json"
        pairs.write_text(json.dumps(pairs_of(json.loads((shapes / "finetune.json").read_text()),
                                             "train", 0)))
        config = DEMO / "dpo.yaml"

        def args(run, b):
            return dpo_args(stage_overrides, pairs, init, run, b, "data.max_length=128")
    one = train(load_config(config, args(tmp_path / "one", "train.batch_size=4")))
    proc = torchrun(["train", str(config), *args(tmp_path / "two", "train.batch_size=2")], env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    two = tmp_path / "two"
    # One run dir, written once: one header and one closing line, one metrics line per step.
    assert err.count(f"[{stage}] run dir {two} on cpu") == 1, err
    assert "x 2 processes" in err
    assert err.count("[done]") == 1
    assert [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    # metrics.jsonl rounds to 5 decimals: equal values may straddle a rounding boundary and
    # come out one unit (1e-5) apart.
    assert losses(two) == pytest.approx(losses(one.run_dir), abs=1.5e-5)
    if stage == "dpo":
        assert column(two, "rewards/margin") == pytest.approx(column(one.run_dir,
                                                                    "rewards/margin"), abs=1.5e-5)
    assert_same_weights(one.run_dir, two, rtol=1e-5)
    if stage == "sft":
        assert_same_weights(one.run_dir, two, atol=1e-5)
    assert (two / "COMPLETE").is_file() and not (two / ".lock").exists()


@pytest.mark.slow
def test_two_processes_resume_after_kill(tmp_path, tiny_lm, multi_turn, env):
    config = DEMO / "sft.yaml"
    # 48 steps: the kill after step 4's checkpoint must land mid-run (8 tiny steps could all
    # finish between two looks at the folder).
    extra = ["train.max_steps=48", "train.save_every=2", "train.batch_size=2"]
    straight = train(load_config(config, sft_args(tiny_lm, multi_turn, tmp_path / "straight",
                                                  "train.batch_size=4", *extra[:2])))
    run = tmp_path / "killed"
    proc = torchrun(["train", str(config), *sft_args(tiny_lm, multi_turn, run, *extra)], env)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-0000004").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    kill_launch(proc)  # the launcher and its workers (each in a session of its own)
    assert not (run / "COMPLETE").exists()
    assert (run / ".lock").exists()  # left by the killed run; taken over below
    resumed_from = int(sorted((run / "checkpoints").iterdir())[-1].name.split("-")[1])
    assert resumed_from < 48

    again = torchrun(["train", str(config), *sft_args(tiny_lm, multi_turn, run, *extra),
                      "train.resume=true"], env)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"step {resumed_from + 1}/48 " in err  # the resumed run trained the rest
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 49))  # nothing logged twice, nothing missing
    # The log rounds losses to 5 decimals: values a hair apart can round 1e-5 apart.
    assert losses(run) == pytest.approx(losses(straight.run_dir), abs=2e-5)
    assert_same_weights(straight.run_dir, run, atol=1e-5)


@pytest.mark.slow
def test_two_nodes_equal_one_node(tmp_path, tiny_lm, multi_turn, env):
    """2 machines x 1 process train as 1 machine x 2 processes, to the bit: the same ranks
    see the same batches and the same sums. The machines here are two torchrun agents on
    this one, meeting by c10d rendezvous on the loopback: first sharing a filesystem (one
    data.cache_dir, where the preparation's lock decides who prepares, and one run dir),
    then sharing none (each its own cache and run dir, at paths of its own here)."""
    config = str(DEMO / "sft.yaml")

    def args(run: str, cache: str, *extra: str) -> list[str]:
        return ["train", config, *sft_args(tiny_lm, multi_turn, tmp_path / run, "train.batch_size=2",
                                           f"data.cache_dir={tmp_path / cache}",
                                           "train.save_every=1", *extra)]

    (err,) = finish([torchrun(args("one", "cache"), env)])
    assert "x 2 processes" in err and "machines" not in err
    for name, runs, caches in (("shared", ["shared"] * 2, ["shared"] * 2),
                               ("own", ["own-a", "own-b"], ["cache-a", "cache-b"])):
        errs = finish(two_nodes([args(run, cache) for run, cache in zip(runs, caches, strict=True)], env))
        (run,) = [tmp_path / r for r in set(runs) if (tmp_path / r / "COMPLETE").is_file()]
        # One run dir, written once, by the main process of the main machine.
        assert sum(err.count(f"[sft] run dir {run} on cpu") for err in errs) == 1, errs
        assert sum(err.count("x 2 processes on 2 machines,") for err in errs) == 1
        assert sum(err.count("[done]") for err in errs) == 1
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] \
            == [1, 2, 3]
        assert losses(run) == losses(tmp_path / "one")
        # Model FLOPs are counted over all processes, whichever machine they are on.
        assert column(run, "flops_per_token_llm") == column(tmp_path / "one", "flops_per_token_llm")
        wa, wb = weights(tmp_path / "one"), weights(run)
        assert wa.keys() == wb.keys() and wa
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert not (run / ".lock").exists()
        for cache in set(caches):  # prepared once per cache folder
            assert len(list((tmp_path / cache).glob("prepared-*"))) == 1, cache
        alone = "is not on a filesystem every machine sees"
        assert (name == "own") == any(alone in err for err in errs)
    # Resuming needs the checkpoints on every machine: refused, naming the fix, not a crash
    # (the other machine found none) or a resume from two different states.
    procs = two_nodes([args(run, cache, "train.resume=true")
                       for run, cache in zip(runs, caches, strict=True)], env)
    errs = [proc.communicate(timeout=600)[1] for proc in procs]
    assert all(proc.returncode != 0 for proc in procs)
    # Process 0, the main one, wrote the checkpoints; process 1 finds none.
    assert all("see different newest checkpoints" in err and "(by process: step 3, none)" in err
               for err in errs), errs


@pytest.mark.slow
@pytest.mark.parametrize("caches", [["f-a", "f-b"], ["f-ab", "f-ab"]], ids=["own", "shared"])
def test_two_nodes_fill_the_feature_cache(tmp_path, stage_overrides, shapes_data, env, caches):
    """Machines without a shared filesystem each have their own data.feature_cache: each
    must hold every image's features (a machine's processes train on any sample), not a
    share of them. Machines that share one compute each image once between them. Same
    weights as one process with one cache."""
    config = DEMO / "pretrain.yaml"
    base = ["data.max_length=64", "train.max_steps=3", "train.warmup_ratio=0"]
    one = train(load_config(config, [*stage_overrides("pretrain", "one"), *base,
                                     "train.batch_size=4", f"data.feature_cache={tmp_path / 'f'}"]))
    run = tmp_path / "two"
    errs = finish(two_nodes([["train", str(config), *stage_overrides("pretrain", "two"), *base,
                              "train.batch_size=2", f"data.feature_cache={tmp_path / cache}"]
                             for cache in caches], env))
    assert not any("skipped" in err for err in errs), errs
    images = {record["image"] for record in json.loads((shapes_data / "pretrain.json").read_text())}
    for cache in ["f", *caches]:
        assert len(list((tmp_path / cache).rglob("*.safetensors"))) == len(images), cache
    computed = len(images) * len(set(caches))  # over both machines
    assert sum(err.count(f"({computed} computed now") for err in errs) == 1, errs
    assert losses(run) == pytest.approx(losses(one.run_dir), abs=1e-5)
    assert_same_weights(one.run_dir, run, atol=1e-5)
