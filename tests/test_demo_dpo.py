"""The demo's third stage, dpo, on its stage 2 (tests/shared_demo.py). The last file `make test`
hands out (tests/conftest.py): whichever worker is free takes it, and starts as soon as stage 2
is trained and scored, beside the demo's last step (MMBench, which only reads stage 2)."""

from __future__ import annotations

import subprocess

import pytest
from shared_demo import REPO, STAGE2_SCORED

from llava_tune.demo import report


@pytest.mark.slow
def test_dpo_stage_on_the_demo(shared_demo):
    """scripts/dpo.sh demo: preference pairs about the shapes after stage 2 (a wrong color, a
    wrong shape, an object that is not there): held-out pairs scored right >= 0.95 of the
    time, and held-out exact match not lower than stage 2's (one answer of 400 may flip
    between machines)."""
    demo = shared_demo.wait(until=STAGE2_SCORED, timeout=2700)
    printed = subprocess.run(["bash", str(REPO / "scripts" / "dpo.sh"), "demo", str(demo)],
                             check=True, env=shared_demo.env, capture_output=True, text=True,
                             timeout=1200).stdout
    scores = report.dpo_scores(demo)
    assert "reward accuracy" in printed and "exact match" in printed, printed
    assert scores["reward_accuracy"] >= 0.95, scores
    assert scores["exact_match_dpo"] >= scores["exact_match_finetune"] - 0.0025, scores
    assert sorted(p.name for p in (demo / "dpo").iterdir() if p.is_dir()) == [
        "llm_adapter", "projector", "reference"]
