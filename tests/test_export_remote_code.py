"""`export --format internlm2` writes config.json with InternLM2's remote-code auto_map; the
export carries the base checkpoint's remote code, so transformers loads it with
trust_remote_code=True, and says so when the base has none to carry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_tune.cli import main
from llava_tune.export import merged_model

REMOTE_CODE = Path(__file__).resolve().parent / "fixtures" / "internlm2_remote_code"
IDS = [1, 8, 20, 30, 40, 7, 19]
LOAD = """\
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True,
                                             dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([json.loads(sys.argv[3])])).logits
torch.save({"module": type(model).__module__, "logits": logits}, sys.argv[2])
"""


@pytest.fixture
def base_with_code(tiny_lm, tmp_path) -> Path:
    """The tiny LM as published InternLM2 checkpoints come: with its remote code (a minimal
    configuration_internlm2.py + modeling_internlm2.py written for these tests)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_lm, base)
    for file in REMOTE_CODE.glob("*.py"):
        shutil.copy2(file, base / file.name)
    return base


def test_export_carries_the_remote_code_and_loads_with_trust_remote_code(
        tiny_finetune_run, base_with_code, tmp_path, capsys):
    out = tmp_path / "internlm2"
    assert main(["export", str(tiny_finetune_run), str(out), "--format", "internlm2",
                 "--base", str(base_with_code)]) == 0
    assert "note:" not in capsys.readouterr().err
    for name in ("configuration_internlm2.py", "modeling_internlm2.py"):
        assert (out / name).read_bytes() == (REMOTE_CODE / name).read_bytes()
    # A fresh Python, as a user runs it; transformers copies the remote code into its
    # modules cache, kept inside tmp_path.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "out.pt"),
                             json.dumps(IDS)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["module"].endswith("modeling_internlm2")  # the export's own code ran
    ours = merged_model(tiny_finetune_run, base_with_code).model.llm
    with torch.no_grad():
        expected = ours(input_ids=torch.tensor([IDS])).logits
    assert torch.allclose(loaded["logits"], expected, atol=1e-4)


def test_export_says_when_the_base_has_no_remote_code(tiny_finetune_run, tiny_lm, tmp_path,
                                                       capsys):
    out = tmp_path / "internlm2"
    assert not list(tiny_lm.glob("*.py"))
    assert main(["export", str(tiny_finetune_run), str(out), "--format", "internlm2"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1
    assert "configuration_internlm2.py, modeling_internlm2.py" in notes[0]
    assert str(tiny_lm) in notes[0] and "trust_remote_code=True" in notes[0]
    assert not list(out.glob("*.py"))
