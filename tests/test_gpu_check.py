"""scripts/gpu_check.sh --dry-run: the real-size GPU check's whole path, with tiny models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_trains_three_stages_with_the_real_configs(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run",
                             str(tmp_path)], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["pretrain", "finetune", "sft"]
    for stage in report["stages"]:
        assert stage["steps"] == 2 and stage["tokens_per_s"] > 0 and stage["peak_memory_mb"] > 0
        assert stage["s_per_step"] > 0 and stage["tokens_per_step"] > 0
        assert stage["wall_s"] >= stage["train_s"] > 0 and stage["tflops"] > 0
        assert stage["mfu"] is None  # the CPU: no peak, no MFU
        assert (tmp_path / f"{stage['stage']}.log").is_file()
    # The real configs were used: stage 2 is QLoRA on top of stage 1's projector.
    config = (tmp_path / "finetune" / "config.yaml").read_text()
    assert "quantization: 4bit" in config and f"init_from: {tmp_path / 'pretrain'}" in config
    assert "pretrain" in result.stdout and "peak memory" in result.stdout
    # The finetune run behind `llava-tune serve`: every request answered, 1 and 8 clients.
    serve = report["serve"]
    assert serve["serve_1_clients"]["errors"] == serve["serve_8_clients"]["errors"] == 0
    assert serve["serve_8_clients"]["requests_per_s"] > 0
    assert serve["vllm"] == "vllm is not installed here" or serve["vllm"]["ok"], serve
