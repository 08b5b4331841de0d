"""Progress bars on the long steps (converting, tokenizing, loading, evaluating): on stderr when
enabled, silent otherwise; the CLI enables them on a terminal unless --quiet."""

from __future__ import annotations

import sys

import pytest

from llava_tune import progress
from llava_tune.assembly.llm import load_llm, load_tokenizer
from llava_tune.cli import main
from llava_tune.convert.internlm2 import convert_internlm2_dir
from llava_tune.data.datasets import ConversationDataset
from llava_tune.data.template import get_template


@pytest.fixture(autouse=True)
def _progress_off():
    yield
    progress.enable(False)


def test_track_and_bar_draw_only_when_enabled(capsys):
    progress.enable(False)
    assert list(progress.track(range(3), total=3, desc="counting")) == [0, 1, 2]
    bar = progress.Bar(4, desc="by hand", unit="question")
    bar.update(2)
    bar.reached(4, 4)
    bar.close()
    assert capsys.readouterr().err == ""

    progress.enable(True)
    assert list(progress.track(range(3), total=3, desc="counting", unit="shard")) == [0, 1, 2]
    err = capsys.readouterr().err
    # A fast loop draws its start only (tqdm redraws at most every 0.1 s), then clears the line.
    assert "counting" in err and "0/3" in err and "shard" in err
    bar = progress.Bar(0, desc="by hand", unit="question")
    bar.reached(2, 5)
    bar.reached(5, 5)
    bar.close()
    err = capsys.readouterr().err
    assert "by hand" in err and "2/5" in err and "5/5" in err and "question" in err


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_conversion_tokenizing_and_loading(tiny_lm, shapes_data, tmp_path, capsys, on):
    progress.enable(on)
    convert_internlm2_dir(tiny_lm, tmp_path / "llama")
    converting = capsys.readouterr().err
    tokenizer = load_tokenizer(tiny_lm)
    ConversationDataset(shapes_data / "text.json", tokenizer, get_template("internlm2_chat"), 64)
    tokenizing = capsys.readouterr().err
    load_llm(tiny_lm, quantization="4bit")  # transformers' own bar
    loading = capsys.readouterr().err
    if on:
        assert f"converting {tiny_lm.name} to Llama" in converting and "0/1" in converting
        assert "shard" in converting
        assert "tokenizing text.json" in tokenizing and "200/200" in tokenizing
        assert "Loading weights" in loading
    else:
        assert converting == tokenizing == loading == ""


@pytest.mark.parametrize("argv, tty, expected", [
    ([], True, True), (["--quiet"], True, False), ([], False, False), (["--quiet"], False, False),
])
def test_cli_enables_progress_on_a_terminal_unless_quiet(capsys, monkeypatch, argv, tty,
                                                         expected):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    progress.enable(not expected)
    assert main([*argv, "configs"]) == 0
    assert progress.enabled() is expected
