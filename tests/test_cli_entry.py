"""The command line's entry: help without arguments, --version, --debug/--quiet after the
command, and what chat/eval say of a model path that holds no model they can load."""

from __future__ import annotations

import pytest

import llava_tune
from llava_tune.cli import main
from llava_tune.errors import UserError


def test_no_arguments_prints_the_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: llava-tune")
    assert "positional arguments" in out and "import-xtuner" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"llava-tune {llava_tune.__version__}\n"


@pytest.mark.parametrize("argv", [["--debug", "train", "{missing}"],
                                  ["train", "{missing}", "--debug"],
                                  ["train", "{missing}", "--quiet", "--debug"]])
def test_debug_before_or_after_the_command(tmp_path, argv):
    argv = [a.format(missing=tmp_path / "nope.yaml") for a in argv]
    with pytest.raises(UserError, match="config file"):
        main(argv)


def test_without_debug_a_user_error_is_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml"), "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: config file {tmp_path / 'nope.yaml'} not found\n"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_a_missing_model_path_is_not_found(tmp_path, capsys, command):
    missing = tmp_path / "no-such-run"
    extra = ["--question", "hi"] if command == "chat" else ["--data", str(tmp_path / "d.json")]
    assert main([command, str(missing), *extra]) == 2
    err = one_error_line(capsys)
    assert f"{missing} not found" in err and "neither" not in err


def test_chat_on_xtuner_output_names_import_xtuner(tmp_path, capsys, tiny_lm):
    from test_xtuner import make_xtuner

    xtuner = make_xtuner(tmp_path / "xtuner-llava", tiny_lm)
    assert main(["chat", str(xtuner), "--question", "hi"]) == 2
    err = one_error_line(capsys)
    assert f"llava-tune import-xtuner {xtuner} RUN_DIR --llm LLM_DIR" in err
