"""The shipped accelerate configs (configs/accelerate/), and launches that cannot work on this
machine refused before any model loads, naming the setting and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from llava_tune.assembly.llm import quantization_config
from llava_tune.config import load_config
from llava_tune.errors import UserError
from llava_tune.launch import (
    check_launch,
    launched_with,
    machines,
    processes_per_machine,
    relaunch_command,
    shards_parameters,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {"multi_gpu.yaml": ("MULTI_GPU", None), "multi_node.yaml": ("MULTI_GPU", None),
            "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
            "deepspeed_zero3.yaml": ("DEEPSPEED", 3), "fsdp.yaml": ("FSDP", None)}


def launch_env(cluster) -> dict[str, str]:
    """The variables `accelerate launch` sets for such a config (what llava-tune reads)."""
    kind = str(cluster.distributed_type).rsplit(".", 1)[-1]
    if kind == "DEEPSPEED":
        return {"ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(cluster.deepspeed_config["zero_stage"])}
    if kind == "FSDP":
        return {"ACCELERATE_USE_FSDP": "true"}
    return {}


def test_every_shipped_config_is_listed():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_accelerates_own_loader(path):
    cluster = load_config_from_file(str(path))
    kind, stage = EXPECTED[path.name]
    assert str(cluster.distributed_type).endswith(kind)
    assert cluster.mixed_precision == "bf16" and not cluster.use_cpu
    if stage is not None:
        assert cluster.deepspeed_config["zero_stage"] == stage
        # train.grad_accum decides the accumulation; a value here would override it.
        assert "gradient_accumulation_steps" not in cluster.deepspeed_config
    if kind == "FSDP":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        assert cluster.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == LlamaDecoderLayer.__name__


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_trainer_reads_the_launch(path, monkeypatch, stage_overrides):
    cluster = load_config_from_file(str(path))
    for key, value in launch_env(cluster).items():
        monkeypatch.setenv(key, value)
    kind, stage = EXPECTED[path.name]
    assert launched_with() == {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(kind, "ddp")
    assert shards_parameters() == (stage == 3 or kind == "FSDP")
    config = load_config(REPO / "configs" / "demo" / "finetune.yaml", stage_overrides("finetune"))
    if kind == "MULTI_GPU":
        check_launch(config)  # plain DDP works anywhere
    elif not torch.cuda.is_available():
        with pytest.raises(UserError, match=f"asks for {launched_with()}, which needs CUDA GPUs"):
            check_launch(config)


def test_sharded_4bit_weights_are_stored_in_the_compute_dtype(monkeypatch):
    plain = quantization_config("4bit", torch.device("cpu"))
    assert plain.bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    sharded = quantization_config("4bit", torch.device("cpu"))
    assert sharded.bnb_4bit_quant_storage == sharded.bnb_4bit_compute_dtype == torch.float32


def test_8bit_cannot_be_sharded(monkeypatch, stage_overrides):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    config = load_config(REPO / "configs" / "demo" / "finetune.yaml",
                         [*stage_overrides("finetune"), "model.quantization=8bit"])
    with pytest.raises(UserError, match="8bit cannot be sharded.*use 4bit"):
        check_launch(config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_fsdp_launch_on_the_cpu_fails_before_loading(tmp_path, tiny_lm, shapes_data):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
         "-m", "llava_tune", "train", str(REPO / "configs" / "demo" / "sft.yaml"),
         f"model.llm={tiny_lm}", f"data.train={shapes_data / 'text.json'}", f"run_dir={run}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "error: this launch cannot work" in result.stderr
    assert "fsdp, which needs CUDA GPUs" in result.stderr and "torchrun" in result.stderr
    assert not run.exists()  # refused before the run dir or the model


def test_machines_and_the_command_that_launches_a_run_again(monkeypatch):
    """torchrun tells each process how many of the launch's processes share its machine
    (LOCAL_WORLD_SIZE); a resumed run is launched again as it was, on as many machines."""
    for name in ("LOCAL_WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    assert relaunch_command(1) == "llava-tune"
    assert machines(4) == 1 and processes_per_machine(4) == 4  # no launcher: one machine
    assert relaunch_command(4) == "torchrun --standalone --nproc_per_node 4 -m llava_tune"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert machines(4) == 1 and relaunch_command(4).startswith("torchrun --standalone")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert processes_per_machine(8) == 2 and machines(8) == 4
    assert relaunch_command(8) == ("torchrun --nnodes 4 --nproc_per_node 2 --rdzv-backend c10d "
                                   "--rdzv-endpoint MAIN_HOST:29500 -m llava_tune")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert relaunch_command(8) == (
        "accelerate launch --config_file YOUR_ACCELERATE_CONFIG --num_processes 8 "
        "--num_machines 4 --machine_rank THIS_MACHINE --main_process_ip MAIN_HOST "
        "--main_process_port 29500 -m llava_tune")


def test_the_multi_node_config_starts_one_agent_per_machine():
    """What `accelerate launch` itself makes of configs/accelerate/multi_node.yaml on the
    second machine: torchrun for 2 machines x 8 processes, this machine's rank, the main
    machine's address (accelerate's own argument handling, as its launcher runs it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args([
        "--config_file", str(REPO / "configs" / "accelerate" / "multi_node.yaml"),
        "--machine_rank", "1", "--main_process_ip", "10.1.2.3",
        "-m", "llava_tune", "train", "configs/internlm2_chat_7b/finetune.yaml"])
    _validate_launch_command(args)
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "10.1.2.3:29500" or (args.master_addr, args.master_port) == (
        "10.1.2.3", "29500")
