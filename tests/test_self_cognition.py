"""The course's self-cognition recipe on the demo's language model: scripts/sft_text.sh with
configs/demo/sft.yaml teaches the demo's InternLM2-layout LM a new name.

Its own file, with its own copy of the demo's LM (the demo's steps 1 and 2, ~2 minutes), so
that `make test`'s second worker trains it while the first runs the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "VIRTUAL_ENV": sys.prefix,
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def cli(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["llava-tune", *map(str, argv)], check=True, env=ENV,
                          capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def demo_lm(tmp_path_factory) -> Path:
    """The demo's tiny LM trained on its text and exported in InternLM2's layout, as
    scripts/demo.sh's steps 1 and 2 make it (fewer images: the LM trains on text alone)."""
    out = tmp_path_factory.mktemp("demo-lm")
    ENV["LLAVA_TUNE_CACHE"] = str(out / "cache")
    subprocess.run([sys.executable, "-m", "llava_tune.demo", str(out), "--train", "100",
                    "--heldout", "10"], check=True, env=ENV, cwd=REPO, capture_output=True)
    cli("train", REPO / "configs" / "demo" / "lm.yaml", f"model.llm={out / 'lm-init'}",
        f"data.train={out / 'shapes' / 'text.json'}", f"run_dir={out / 'lm-train'}",
        timeout=1200)
    cli("export", out / "lm-train", out / "lm", "--format", "internlm2", timeout=600)
    return out / "lm"


@pytest.mark.slow
def test_self_cognition_sft_on_the_demo_lm(demo_lm, tmp_path):
    """It learns its new name and its maker's."""
    data = tmp_path / "self.json"
    subprocess.run([sys.executable, str(REPO / "scripts/make_self_cognition.py"), "--name",
                    "Nova", "--author", "Ada Lab", "--out", str(data)], check=True)
    run = tmp_path / "nova"
    subprocess.run(["bash", str(REPO / "scripts/sft_text.sh"), str(demo_lm), str(data),
                    str(run)], check=True, env={**ENV, "CONFIG": str(REPO / "configs/demo/sft.yaml")},
                   timeout=1200)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["llm_adapter"]
    answer = cli("chat", run, "--question", "Who are you?", timeout=300).stdout
    assert "Nova" in answer and "Ada Lab" in answer, answer
