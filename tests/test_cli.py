"""The command line through `main(argv)`: user mistakes exit 2 with the fix and no traceback;
train, eval and export work end to end on the tiny fixtures."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import LOGGED, SMALL, fixture_overrides, run_cli

from llava_tune.assembly.llm import load_llm
from llava_tune.cli import main
from llava_tune.config import Config, valid_keys
from llava_tune.convert.internlm2 import is_internlm2_dir

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"


# --------------------------------------------------------------------------- user mistakes


def test_train_config_typo_lists_valid_keys(tmp_path, capsys, stage_overrides):
    config = yaml.safe_load((DEMO / "pretrain.yaml").read_text())
    config["train"]["batch_sise"] = 4
    config["lerning_rate"] = 1
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "train", bad, *stage_overrides("pretrain"))
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err and "Traceback" not in out
    # Both problems at once, with the file named and every valid key listed.
    assert "unknown key train.batch_sise" in err
    assert "unknown key lerning_rate" in err
    assert str(bad) in err
    valid_line = next(line for line in err.splitlines() if line.startswith("valid keys: "))
    assert valid_line.removeprefix("valid keys: ").split(", ") == valid_keys(Config)
    assert "train.batch_size" in valid_line and "train.lr" in valid_line
    assert not (tmp_path / "run").exists()


def test_train_override_typo_exits_2(capsys, stage_overrides, tmp_path):
    code, _, err = run_cli(capsys, "train", DEMO / "pretrain.yaml", *stage_overrides("pretrain"),
                           "train.lrr=1e-3")
    assert code == 2 and "override 'train.lrr=1e-3': unknown key 'lrr' in train" in err
    assert str(DEMO / "pretrain.yaml") not in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_missing_data_file_names_it(capsys, stage_overrides, tmp_path):
    missing = tmp_path / "nowhere" / "data.json"
    code, out, err = run_cli(capsys, "train", DEMO / "pretrain.yaml", *stage_overrides("pretrain"),
                             f"data.train={missing}")
    assert code == 2
    assert err.startswith("error: ") and str(missing) in err and "data.train" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_missing_image_folder_names_it(capsys, stage_overrides, tmp_path):
    missing = tmp_path / "no-images"
    code, _, err = run_cli(capsys, "train", DEMO / "pretrain.yaml", *stage_overrides("pretrain"),
                           f"data.image_folder={missing}")
    assert code == 2
    assert err.startswith("error: ") and str(missing) in err and "image_folder" in err
    assert "Traceback" not in err


def test_train_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", tmp_path / "nope.yaml")
    assert code == 2 and str(tmp_path / "nope.yaml") in err and "not found" in err


def test_eval_and_export_of_a_missing_run_dir(capsys, tmp_path, shapes_data):
    code, _, err = run_cli(capsys, "eval", tmp_path / "no-run", "--data",
                           shapes_data / "heldout.json")
    assert code == 2 and str(tmp_path / "no-run") in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "export", tmp_path / "no-run", tmp_path / "out",
                           "--format", "internlm2")
    assert code == 2 and str(tmp_path / "no-run") in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- train + eval


TRAIN_OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, tiny_lm, tiny_vision, shapes_data) -> Path:
    run = tmp_path_factory.mktemp("cli") / "pretrain"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # not a terminal: a line per log instead of a bar
        code = main(["train", str(DEMO / "pretrain.yaml"),
                     *fixture_overrides("pretrain", tiny_lm, tiny_vision, shapes_data, run), *LOGGED,
                     "train.max_steps=2"])
    assert code == 0
    TRAIN_OUTPUT["stderr"] = err.getvalue()
    return run


def test_train_prints_progress_and_writes_the_run(pretrain_run):
    err = TRAIN_OUTPUT["stderr"]
    lines = err.splitlines()
    assert lines[0] == f"[pretrain] run dir {pretrain_run} on cpu, LLM frozen, vision tower frozen"
    assert any(line.strip().startswith("projector") and "trainable of" in line for line in lines)
    assert "data: 64 of 64 samples kept" in err
    metrics = [json.loads(line) for line in (pretrain_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # One progress line per logged step, with the loss metrics.jsonl recorded.
    for m in metrics:
        assert f"step {m['step']}/2 loss {m['loss']:.4f}" in err
    assert lines[-1] == f"[done] 2 steps, last loss {metrics[-1]['loss']:.4f}, weights (projector) in {pretrain_run}"
    assert (pretrain_run / "projector" / "model.safetensors").is_file()


def test_eval_writes_predictions_and_accuracy(pretrain_run, shapes_data, tmp_path, capsys):
    heldout = json.loads((shapes_data / "heldout.json").read_text())[:4]
    # One multi-turn record: two human turns with a gpt reply each, so two predictions.
    first = heldout[0]
    heldout.append({"id": "multi", "image": first["image"], "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the shape?"},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "What shape is this?"},
        {"from": "gpt", "value": "It is a star."}]})
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps(heldout))
    preds, acc = tmp_path / "preds.jsonl", tmp_path / "acc.json"

    code, out, err = run_cli(capsys, "eval", pretrain_run, "--data", data, "--image-folder",
                             shapes_data / "images", "--out", preds, "--json", acc,
                             "--max-new-tokens", "4")
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6
    assert [r["id"] for r in rows] == [r["id"] for r in heldout[:4]] + ["multi", "multi"]
    for row, record in zip(rows[:4], heldout[:4], strict=True):
        assert {"id", "question", "prediction", "answer"} <= set(row)
        assert row["question"] == record["conversations"][0]["value"].replace("<image>\n", "")
        assert row["answer"] == record["conversations"][1]["value"]
        assert isinstance(row["prediction"], str)
    assert [r["question"] for r in rows[4:]] == ["What color is the shape?", "What shape is this?"]
    assert [r["answer"] for r in rows[4:]] == ["It is red.", "It is a star."]
    assert [r["turn"] for r in rows] == [1, 1, 1, 1, 1, 2]

    summary = json.loads(acc.read_text())
    correct = sum(r["correct"] for r in rows)
    assert summary["total"] == 6 and summary["correct"] == correct
    # Follow-up answers are scored apart: the demo prints its second-turn accuracy.
    assert {t: s["total"] for t, s in summary["by_turn"].items()} == {"1": 5, "2": 1}
    assert summary["by_turn"]["2"]["accuracy"] == rows[5]["correct"]
    assert any("answer 2 of a conversation (n=1)" in line for line in out.splitlines())
    assert summary["accuracy"] == pytest.approx(correct / 6)
    lines = out.splitlines()
    assert lines[0] == f"accuracy {correct / 6:.4f} ({correct}/6)"
    assert any("What color is the shape?" in line for line in lines[1:])


def test_eval_without_image_folder_asks_for_it(pretrain_run, shapes_data, capsys):
    code, _, err = run_cli(capsys, "eval", pretrain_run, "--data", shapes_data / "heldout.json")
    assert code == 2 and "--image-folder" in err


# --------------------------------------------------------------------------- export


def test_export_sft_full_run_as_internlm2(tmp_path, capsys, tiny_lm, tiny_vision, shapes_data):
    run = tmp_path / "sft"
    code, _, err = run_cli(capsys, "train", DEMO / "lm.yaml",
                           *fixture_overrides("lm", tiny_lm, tiny_vision, shapes_data, run), *SMALL,
                           "train.max_steps=2", "train.lr=1e-2")
    assert code == 0, err
    assert "[done] 2 steps" in err
    assert (run / "llm").is_dir()

    out_dir = tmp_path / "exported"
    code, out, err = run_cli(capsys, "export", run, out_dir, "--format", "internlm2")
    assert code == 0, err
    assert str(out_dir) in out
    assert is_internlm2_dir(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["num_hidden_layers"] == 2
    assert (out_dir / "tokenizer.model").is_file()
    from safetensors import safe_open

    keys = set()
    for file in out_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    assert "model.layers.0.attention.wqkv.weight" in keys and "output.weight" in keys
    assert not any("q_proj" in k for k in keys)

    exported, tokenizer = load_llm(out_dir, device="cpu")
    trained, trained_tokenizer = load_llm(run / "llm", device="cpu")
    base, _ = load_llm(tiny_lm, device="cpu")
    text = "<|im_start|>user\nWhat color is the shape?<|im_end|>\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == trained_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got, want, before = (m(input_ids=ids).logits for m in (exported, trained, base))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, want, atol=1e-3)  # the export holds the trained weights
