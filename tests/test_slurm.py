"""scripts/slurm_train.sh builds the launch that tests/test_distributed.py runs for real (one
torchrun agent per machine, c10d rendezvous at the job's first machine). SLURM is not here:
`scontrol` and `srun` are stand-ins that answer for a two-machine job and write down what
they were asked to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_train.sh"


def fake_slurm(folder: Path) -> Path:
    """A bin folder with `scontrol show hostnames` (gpu-a, gpu-b) and an `srun` that writes
    its arguments, one a line, to $SRUN_ARGS."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def run_script(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = fake_slurm(tmp_path)
    record = tmp_path / "srun.txt"
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(record),
            "HOME": str(tmp_path), "USER": "someone", "TMPDIR": "/scratch"}
    result = subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    return result, record.read_text().splitlines() if record.is_file() else []


def test_one_torchrun_agent_per_machine_meeting_at_the_first(tmp_path):
    result, argv = run_script(
        tmp_path, "configs/internlm2_chat_7b/finetune.yaml", "train.grad_accum=2",
        SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
        SLURM_JOB_ID="1234", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="32")
    assert result.returncode == 0, result.stderr
    assert "on 2 machines x 8 GPUs, rendezvous at gpu-a:21234" in result.stderr
    python = str(REPO / ".venv" / "bin" / "python")
    assert argv == ["--kill-on-bad-exit=1", "--ntasks-per-node=1",
                    "env", "TOKENIZERS_PARALLELISM=false", python, "-m", "torch.distributed.run",
                    "--nnodes", "2", "--nproc_per_node", "8",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-a:21234", "--rdzv-id", "1234",
                    "-m", "llava_tune", "train", "configs/internlm2_chat_7b/finetune.yaml",
                    "data.cache_dir=/scratch/llava-tune-data-someone", "train.grad_accum=2"]


def test_settings_from_the_environment(tmp_path):
    result, argv = run_script(
        tmp_path, "my.yaml", SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_JOB_NUM_NODES="2",
        GPUS_PER_NODE="4", MASTER_PORT="29555", DATA_CACHE="", PYTHON=sys.executable,
        ROOT=str(REPO))
    assert result.returncode == 0, result.stderr
    assert argv[4] == sys.executable
    assert argv[argv.index("--nproc_per_node") + 1] == "4"
    assert "gpu-a:29555" in argv
    assert argv[-3:] == ["llava_tune", "train", "my.yaml"]  # DATA_CACHE= keeps the config's


def test_refused_outside_slurm_or_without_a_config(tmp_path):
    result, argv = run_script(tmp_path, "my.yaml")
    assert result.returncode != 0 and "run this with sbatch" in result.stderr and not argv
    result, argv = run_script(tmp_path, SLURM_JOB_NODELIST="gpu-a")
    assert result.returncode == 2 and "usage: sbatch scripts/slurm_train.sh CONFIG" in result.stderr
