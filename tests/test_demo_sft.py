"""The course's self-cognition recipe on the demo's LM (tests/shared_demo.py): it needs only
the LM the demo trains first, so it runs beside the demo's later stages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from shared_demo import LM_READY, REPO


@pytest.mark.slow
def test_self_cognition_sft_on_the_demo_lm(shared_demo, tmp_path):
    """scripts/sft_text.sh with configs/demo/sft.yaml on the demo's LM (InternLM2 layout,
    demo/lm) teaches it its new name and its maker's."""
    lm = shared_demo.wait(until=LM_READY, timeout=2700) / "lm"
    data = tmp_path / "self.json"
    subprocess.run([sys.executable, str(REPO / "scripts/make_self_cognition.py"), "--name",
                    "Nova", "--author", "Ada Lab", "--out", str(data)], check=True)
    run = tmp_path / "nova"
    subprocess.run(["bash", str(REPO / "scripts/sft_text.sh"), str(lm), str(data), str(run)],
                   check=True, timeout=1200,
                   env={**shared_demo.env, "CONFIG": str(REPO / "configs/demo/sft.yaml")})
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["llm_adapter"]
    answer = subprocess.run(["llava-tune", "chat", str(run), "--question", "Who are you?"],
                            check=True, env=shared_demo.env, capture_output=True, text=True,
                            timeout=300).stdout
    assert "Nova" in answer and "Ada Lab" in answer, answer
