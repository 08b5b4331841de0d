"""`llava-tune eval RUN --mmbench FILE.tsv [--circular] [--out DIR]` on a tiny finetuned run and
the generated shapes TSV: the same scores and files as the library with the same model's
answers; bad input is one line on stderr, found before the model loads."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import run_cli

from llava_tune import progress
from llava_tune.assembly import model as assembly_model
from llava_tune.cli import main
from llava_tune.cli.mmbench import answer_batch_fn
from llava_tune.demo import mmbench as shapes_mmbench
from llava_tune.inference.generate import GenerationSettings
from llava_tune.inference.mmbench import evaluate_mmbench_batched

N_IMAGES = 5  # 10 questions, 40 passes in CircularEval
ARGS = ["--max-new-tokens", "3", "--batch-size", "7"]


@pytest.fixture(autouse=True)
def _progress_off():
    yield
    progress.enable(False)


@pytest.fixture(scope="module")
def tsv(tmp_path_factory) -> Path:
    return shapes_mmbench.write_shapes_tsv(tmp_path_factory.mktemp("tsv") / "shapes.tsv",
                                           N_IMAGES, seed=0, image_size=32)


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return rows[0], rows[1:]


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerows([header, *rows])
    return path


def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the input is bad")

    monkeypatch.setattr(assembly_model, "load_run", refuse)


# --------------------------------------------------------------------------- the scores


@pytest.mark.parametrize("circular", [False, True], ids=["plain", "circular"])
def test_cli_scores_and_files_equal_the_librarys(tiny_finetune_run, tsv, tmp_path, capsys, circular):
    out = tmp_path / "cli"
    flags = ["--circular"] if circular else []
    code, stdout, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, *flags,
                                "--out", out, *ARGS)
    assert code == 0, err
    summary = json.loads((out / "shapes_summary.json").read_text())

    # The library, asked with the same model's batched greedy answers.
    bundle = assembly_model.load_run(tiny_finetune_run)
    reference = evaluate_mmbench_batched(
        tsv, answer_batch_fn(bundle, GenerationSettings(max_new_tokens=3)), circular=circular,
        out_dir=tmp_path / "lib", batch_size=7)
    expected = reference.summary()
    for key in ("predictions_file",):
        assert summary.pop(key) == str(out / "shapes_predictions.tsv")
        expected.pop(key)
    assert summary == expected
    assert (out / "shapes_predictions.tsv").read_text() == reference.predictions_file.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["shapes_predictions.tsv",
                                                     "shapes_summary.json"]

    # MMBench's submission layout: the TSV's columns but the image, plus prediction.
    header, rows = read_rows(tsv)
    frame = pd.read_csv(out / "shapes_predictions.tsv", sep="\t", dtype=str,
                        keep_default_na=False)
    assert list(frame.columns) == [c for c in header if c != "image"] + ["prediction"]
    assert len(frame) == (4 if circular else 1) * 2 * N_IMAGES
    assert summary["questions"] == 2 * N_IMAGES and summary["circular"] is circular

    # What the terminal shows is the summary.
    lines = stdout.splitlines()
    overall = reference.overall
    first = "circular" if circular else "accuracy"
    assert lines[0] == (f"MMBench shapes.tsv {first} {overall.accuracy:.4f} "
                        f"({overall.correct}/{overall.total})")
    assert lines[1].split() == ["color", f"{reference.category['color'].accuracy:.4f}",
                                f"({reference.category['color'].correct}/{N_IMAGES})"]
    if circular:
        plain = reference.plain
        assert lines[3] == (f"MMBench shapes.tsv plain {plain.accuracy:.4f} "
                            f"({plain.correct}/{plain.total})")
    assert f"wrote {out / 'shapes_predictions.tsv'}" in err


def test_without_out_nothing_is_written(tiny_finetune_run, tsv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, *ARGS)
    assert code == 0 and stdout.startswith("MMBench shapes.tsv accuracy ")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad input


def assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    for needle in needles:
        assert needle in err, err


def test_tsv_missing_columns(tiny_finetune_run, tsv, tmp_path, capsys, monkeypatch):
    header, rows = read_rows(tsv)
    drop = [header.index("question"), header.index("image")]
    bad = write_rows(tmp_path / "bad.tsv", [c for i, c in enumerate(header) if i not in drop],
                     [[v for i, v in enumerate(row) if i not in drop] for row in rows])
    no_model_load(monkeypatch)
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", bad, "--out",
                           tmp_path / "out")
    assert_one_error(code, err, str(bad), "question", "image")
    assert not (tmp_path / "out" / "bad_predictions.tsv.partial").exists()


def test_tsv_with_broken_base64(tiny_finetune_run, tsv, tmp_path, capsys, monkeypatch):
    header, rows = read_rows(tsv)
    image = header.index("image")
    broken = [[*row[:image], "not base64 at all!", *row[image + 1:]] for row in rows]
    bad = write_rows(tmp_path / "broken.tsv", header, broken)
    no_model_load(monkeypatch)
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", bad, "--out",
                           tmp_path / "out")
    assert_one_error(code, err, str(bad), "cannot be decoded", "base64")
    assert not (tmp_path / "out" / "broken_predictions.tsv.partial").exists()


def test_one_broken_image_is_skipped_and_reported(tiny_finetune_run, tsv, tmp_path, capsys):
    header, rows = read_rows(tsv)
    image = header.index("image")
    # 60 questions: one broken image (a PNG cut short) is within the 5% that may be skipped.
    many = [[str(i), *row[1:]] for i, row in enumerate(rows * 6)]
    many[3][image] = base64.b64encode(base64.b64decode(many[3][image])[:60]).decode()
    bad = write_rows(tmp_path / "one_bad.tsv", header, many)
    code, stdout, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", bad, "--out",
                                tmp_path / "out", *ARGS)
    assert code == 0, err
    assert "skipped index 3 (line 5):" in err and "cannot be decoded" in err
    summary = json.loads((tmp_path / "out" / "one_bad_summary.json").read_text())
    assert summary["skipped_questions"] == 1 and summary["scored"] == 59
    assert "/59)" in stdout.splitlines()[0]


def test_argument_mistakes(tiny_finetune_run, tsv, tmp_path, capsys, shapes_data, monkeypatch):
    no_model_load(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tiny_finetune_run), "--mmbench", str(tsv), "--data", "x.json"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_finetune_run)])
    assert "one of the arguments --data --mmbench is required" in capsys.readouterr().err
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--data", shapes_data / "heldout.json",
                           "--circular")
    assert_one_error(code, err, "--circular is for --mmbench")
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, "--image-folder",
                           shapes_data / "images")
    assert_one_error(code, err, "--image-folder is for --data")
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, "--json",
                           tmp_path / "a.json")
    assert_one_error(code, err, "--json is for --data")
    a_file = tmp_path / "file"
    a_file.write_text("")
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, "--out", a_file)
    assert_one_error(code, err, f"output folder {a_file} is a file")
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tmp_path / "none.tsv")
    assert_one_error(code, err, str(tmp_path / "none.tsv"), "not found")
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, "--batch-size", "0")
    assert_one_error(code, err, "--batch-size 0 must be at least 1")


def test_a_run_that_fails_to_load_leaves_no_partial_file(tsv, tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", tmp_path / "no-run", "--mmbench", tsv, "--out",
                           tmp_path / "out")
    assert_one_error(code, err, str(tmp_path / "no-run"))
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- progress


def test_progress_bar_on_a_terminal_only(tiny_finetune_run, tsv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, *ARGS)
    assert code == 0
    assert "evaluating" in err and "/10 [" in err and "question" in err
    code, _, err = run_cli(capsys, "--quiet", "eval", tiny_finetune_run, "--mmbench", tsv, *ARGS)
    assert code == 0 and "evaluating" not in err and "%|" not in err
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--mmbench", tsv, *ARGS)
    assert code == 0 and "evaluating" not in err and "%|" not in err
