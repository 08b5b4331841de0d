"""scripts/bench_anyres.py end to end on a few scenes: every arm trains, evaluates and lands
in the table and the JSON with the image tokens its reading gives (the numbers it reports
for the README come from the full-size run, not from here)."""

from __future__ import annotations

import json

import bench_anyres
import pytest

from llava_tune.demo import scenes


def test_unknown_arm_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_anyres.main(["--arms", "detail-pad,tiles"])
    assert exit_info.value.code == 2
    assert "choose from detail-pad,detail-anyres,pair,clip" in capsys.readouterr().err


@pytest.mark.slow
def test_every_arm_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "results.json"
    code = bench_anyres.main(["--train", "6", "--test", "3", "--epochs", "1", "--text", "64",
                              "--work", str(tmp_path / "work"), "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert code == (0 if all(results["targets"].values()) else 1)
    arms = results["results"]
    assert list(arms) == ["detail-pad", "detail-anyres", "pair", "clip"]
    for name, row in arms.items():
        assert name in printed
        assert 0 <= row["accuracy"] <= 1 and row["tokens_per_s"] > 0 and row["steps"] >= 1
    # The demo tower reads 64 px as 4 x 4 patches: pad is 16 tokens an image; anyres adds
    # 4 tiles' 64 and a newline per row of the tiles' map: 4 rows wide (84), 8 square (88),
    # 16 tall (96); a pair is two squares; a clip 8 frames pooled to 2 x 2 plus the newline
    # that ends it.
    assert arms["detail-pad"]["image_tokens"] == 16
    assert 84 <= arms["detail-anyres"]["image_tokens"] <= 96
    assert arms["pair"]["image_tokens"] == 32
    assert arms["clip"]["image_tokens"] == 8 * 4 + 1
    assert set(arms["pair"]["by_question"]) == {scenes.PAIR_COLOR_QUESTION,
                                                scenes.PAIR_SAME_QUESTION}
    assert set(results["targets"]) == {"detail: anyres >= pad + 0.15",
                                       "pair: second-image color >= 0.9", "clip: >= 0.8"}
