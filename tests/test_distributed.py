"""Every token weighs the same: batch 4, batch 2 x accumulation 2 and 2 processes x batch 2
train to the same weights; several processes on the CPU (torchrun + gloo) write one run dir,
one metrics.jsonl and one progress report, and resume after a kill."""

from __future__ import annotations

import json
import os
import random
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


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


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


def torchrun(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node 2 -m llava_tune ...` on the CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", "-m", "llava_tune", "--quiet", *args]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


@pytest.fixture
def env(tmp_path) -> dict:
    # One thread per process: the two processes share the machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "LLAVA_TUNE_CACHE": os.environ["LLAVA_TUNE_CACHE"]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "finetune"])
def test_two_processes_equal_one(tmp_path, tiny_lm, multi_turn, stage_overrides, env, stage):
    if stage == "sft":
        config, args = DEMO / "sft.yaml", lambda run, b: sft_args(tiny_lm, multi_turn, run, b)
    else:
        config, args = DEMO / "finetune.yaml", lambda run, b: finetune_args(stage_overrides, run, b)
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
    assert losses(two) == pytest.approx(losses(one.run_dir), abs=1e-5)
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
