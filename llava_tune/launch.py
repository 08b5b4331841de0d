"""How a run was launched (one process, torchrun / accelerate launch, DeepSpeed, FSDP), and the
launches that cannot work here, refused before any model loads."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from llava_tune.config import Config
from llava_tune.errors import UserError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launched_with() -> str:
    """"deepspeed", "fsdp" or "ddp" as `accelerate launch` announces it in the environment."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of a DeepSpeed launch (from accelerate's env or the DeepSpeed JSON)."""
    if launched_with() != "deepspeed":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    return None


def shards_parameters() -> bool:
    """ZeRO-3 and FSDP shard the parameters themselves, which needs every parameter, 4-bit
    ones included, stored in one dtype (bitsandbytes' bnb_4bit_quant_storage)."""
    return launched_with() == "fsdp" or deepspeed_zero_stage() == 3


def processes_per_machine(processes: int) -> int:
    """How many of a launch's `processes` run on this machine: torchrun's LOCAL_WORLD_SIZE
    (`accelerate launch` runs torchrun too), else all of them (one machine)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return int(local) if local and int(local) > 0 else processes


def machines(processes: int) -> int:
    """How many machines (nodes) a launch of `processes` processes spans. torchrun gives every
    machine the same --nproc_per_node, so this is a division, not a count of host names."""
    return max(1, processes // processes_per_machine(processes))


def relaunch_command(processes: int) -> str:
    """The launcher part of a command that starts a run again as this one was started, with
    as many processes (and machines): `... train CONFIG` follows it. On several machines it
    runs on each of them, with the main machine's address in place of MAIN_HOST (and, for
    accelerate, each machine's own rank in place of THIS_MACHINE)."""
    if processes == 1:
        return "llava-tune"
    per_machine, nodes = processes_per_machine(processes), machines(processes)
    if launched_with() in ("deepspeed", "fsdp"):
        several = (f" --num_machines {nodes} --machine_rank THIS_MACHINE --main_process_ip "
                   "MAIN_HOST --main_process_port 29500" if nodes > 1 else "")
        return (f"accelerate launch --config_file YOUR_ACCELERATE_CONFIG --num_processes "
                f"{processes}{several} -m llava_tune")
    if nodes > 1:
        return (f"torchrun --nnodes {nodes} --nproc_per_node {per_machine} --rdzv-backend c10d "
                "--rdzv-endpoint MAIN_HOST:29500 -m llava_tune")
    return f"torchrun --standalone --nproc_per_node {processes} -m llava_tune"


def check_launch(config: Config) -> None:
    """Refuse, before loading anything, a launch that cannot work on this machine, naming the
    setting and the fix."""
    how = launched_with()
    problems = []
    if how in ("deepspeed", "fsdp") and not torch.cuda.is_available():
        problems.append(f"the accelerate config asks for {how}, which needs CUDA GPUs, and this "
                        "machine has none: launch without it (several CPU processes: "
                        "`torchrun --standalone --nproc_per_node N -m llava_tune train ...`)")
    if how == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append("the accelerate config asks for DeepSpeed, which is not installed: "
                        "`pip install -e .[deepspeed]`")
    if shards_parameters() and config.model.quantization == "8bit":
        problems.append(f"model.quantization=8bit cannot be sharded by {how} "
                        f"{'ZeRO-3' if how == 'deepspeed' else ''}; use 4bit (QLoRA) or "
                        "DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)")
    if shards_parameters() and config.model.quantization == "4bit" and \
            mixed_precision(config.train.mixed_precision) == "no" and torch.cuda.is_available():
        problems.append("4-bit weights sharded by ZeRO-3 / FSDP are stored in the compute dtype; "
                        "set train.mixed_precision=bf16 (or auto)")
    if problems:
        raise UserError("this launch cannot work:\n  " + "\n  ".join(problems))


def mixed_precision(setting: str) -> str:
    """accelerate's mixed precision for train.mixed_precision: auto is bf16 on GPUs that have
    it, fp16 on older GPUs, none on the CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"
