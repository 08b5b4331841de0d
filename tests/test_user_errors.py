"""Users breaking things, by mistake or on purpose, against the CLI: bad data, bad config,
broken run dirs, export targets, concurrency, interruption.

Every case exits 2 (130 for Ctrl-C) with one message that names the file, record or key and
the fix, shows no traceback, and leaves the files that were there before as they were.

(Over 400 lines: a catalogue of user mistakes, one short test each, grouped by what breaks.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import LOGGED, STAGE_DATA, fixture_overrides, run_cli
from safetensors.torch import load_file

from llava_tune import rundir
from llava_tune.cli import main
from llava_tune.errors import UserError
from llava_tune.inference import evaluate as evaluate_module
from llava_tune.training import loop as loop_module
from llava_tune.training.events import Logged

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"


# --------------------------------------------------------------------------- helpers


def refused(capsys, argv: list, *words: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` message holding every one of `words`."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in out + err
    assert err.startswith("error: "), err
    for word in words:
        assert str(word) in err, f"{word!r} not in:\n{err}"
    return err


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), to show nothing was lost or changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def overrides(stage: str, tiny_lm, tiny_vision, shapes_data, run_dir, *extra) -> list[str]:
    """The tiny fixtures and LOGGED; the text stages (lm, sft) without a vision tower."""
    if stage in ("lm", "sft"):
        fixtures = [f"model.llm={tiny_lm}", f"data.train={shapes_data / STAGE_DATA[stage]}",
                    f"run_dir={run_dir}"]
    else:
        fixtures = fixture_overrides(stage, tiny_lm, tiny_vision, shapes_data, run_dir)
    return [*fixtures, *LOGGED, *extra]


def pretrain_argv(tiny_lm, tiny_vision, shapes_data, run_dir, *extra) -> list[str]:
    return ["train", DEMO / "pretrain.yaml",
            *overrides("pretrain", tiny_lm, tiny_vision, shapes_data, run_dir, *extra)]


def _head_and_tail(text: str, n: int = 2500) -> str:
    """Where a process's stderr starts (the first error) and ends (the final one)."""
    return text if len(text) <= 2 * n else f"{text[:n]}\n[...]\n{text[-n:]}"


def wait_for_logged_steps(proc: subprocess.Popen, run: Path, steps: int,
                          timeout: float = 300) -> None:
    """Wait until a training process has logged `steps` lines into run/metrics.jsonl (so it
    is mid-run), failing with its stderr if it exits first."""
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < steps:
        assert proc.poll() is None, _head_and_tail(proc.communicate()[1])
        assert time.time() < deadline, f"{steps} logged steps not reached in {timeout} s"
        time.sleep(0.05)


def records(shapes_data, name="pretrain.json", n=8) -> list[dict]:
    return json.loads((shapes_data / name).read_text())[:n]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_lm, tiny_vision, shapes_data) -> Path:
    """A finished pretrain run (2 steps, a checkpoint at each)."""
    run = tmp_path_factory.mktemp("finished") / "pretrain"
    assert main([str(a) for a in pretrain_argv(tiny_lm, tiny_vision, shapes_data, run,
                                                "train.max_steps=2", "train.save_every=1")]) == 0
    return run


@pytest.fixture(scope="module")
def finished_lora(tmp_path_factory, tiny_lm, tiny_vision, shapes_data) -> Path:
    """A finished text-only LoRA run (llm_adapter/)."""
    run = tmp_path_factory.mktemp("finished") / "sft"
    assert main(["train", str(DEMO / "sft.yaml"),
                 *overrides("sft", tiny_lm, tiny_vision, shapes_data, run, "data.pack=false",
                            "train.max_steps=2")]) == 0
    return run


@pytest.fixture
def copy_of(tmp_path):
    def copy(run: Path, name: str = "copy") -> Path:
        return Path(shutil.copytree(run, tmp_path / name))

    return copy


class Payload:
    """Unpickling this runs `open(marker, "w")`: a stand-in for code hidden in a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- bad data


def test_data_file_not_utf8(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data):
    data = tmp_path / "latin1.json"
    text = json.dumps(records(shapes_data), ensure_ascii=False).replace("A yellow", "Á yellow")
    data.write_bytes(text.encode("latin-1"))
    before = snapshot(tmp_path)
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"data.train={data}"], str(data), "not UTF-8", "line 1", "save it as UTF-8")
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_data_record_with_a_number_as_image(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data):
    rows = records(shapes_data)
    rows[3]["image"] = 5
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"data.train={data}"],
            f"{data} record 3 (id 'train-000003')", "'image' is 5", "image file path",
            "data.max_bad_fraction")


def test_data_file_holding_one_object(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data):
    data = tmp_path / "wrapped.json"
    data.write_text(json.dumps({"version": 1, "data": records(shapes_data)}, indent=2))
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"data.train={data}"],
            str(data), "holds one JSON object", "not a list of records",
            "the records seem to be under 'data'", "JSON list", "JSONL")
    by_id = tmp_path / "by_id.json"
    by_id.write_text(json.dumps({r["id"]: r for r in records(shapes_data)}, indent=2))
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"data.train={by_id}"],
            str(by_id), "holds one JSON object", "values of one object keyed by id",
            "as a list")


def test_one_record_files_still_read(tmp_path, shapes_data):
    """A pretty-printed single record, or a one-line JSONL file, is one record, not an error;
    one of an unknown format is named as a record."""
    from llava_tune.data.formats import read_conversations

    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "q", "completion": "a"}))
    with pytest.raises(UserError, match=re.escape(f"{odd} record 0 has keys ['completion', "
                                                  "'prompt'], which match no known format")):
        read_conversations(odd)

    record = records(shapes_data, n=1)[0]
    for name, text in (("one.json", json.dumps(record, indent=2)), ("one.jsonl", json.dumps(record))):
        (tmp_path / name).write_text(text)
        result = read_conversations(tmp_path / name)
        assert [r["id"] for r in result.records] == ["train-000000"] and not result.problems


def test_data_file_of_strings(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data):
    data = tmp_path / "strings.json"
    data.write_text(json.dumps(["A red circle.", "A blue star."]))
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"data.train={data}"],
            str(data), "holds no JSON object records", "str", "'conversations'", '"from": "gpt"')


def test_data_record_without_an_answer(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data):
    rows = records(shapes_data)
    rows[2]["conversations"] = rows[2]["conversations"][:1]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"data.train={data}"],
            f"{data} record 2 (id 'train-000002')", "no assistant (gpt) turn",
            "add the answer as a 'gpt'")


def test_max_length_too_small_for_the_image(capsys, tmp_path, tiny_lm, tiny_vision,
                                             shapes_data):
    rows = records(shapes_data)
    for row in rows:  # the image after a long question: max_length=16 cuts through it
        row["conversations"][0]["value"] = "Look closely at this picture please. <image>"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    argv = [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run",
                           "train.max_steps=1"), f"data.train={data}"]
    err = refused(capsys, [*argv, "data.max_length=16"], str(data), "no usable samples",
                  "an image does not fit in max_length", "data.max_length=16 is too small",
                  "each image alone takes 4 tokens")
    suggested = err.split("Set data.max_length=")[1].split(" ")[0]
    code, _, err = run_cli(capsys, *argv, f"data.max_length={suggested}")
    assert code == 0, err  # the suggestion fits


# --------------------------------------------------------------------------- bad config


def test_config_file_not_utf8(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_bytes("stage: pretrain\n# r\xe9sum\xe9\n".encode("latin-1"))
    refused(capsys, ["train", config], str(config), "not UTF-8", "save the config as UTF-8")


def test_config_file_not_valid_yaml(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("stage: pretrain\ntrain:\n  lr: [1e-4\n")
    err = refused(capsys, ["train", config], str(config), "not valid YAML", "line 4, column 1",
                  "fix it there")
    assert len(err.strip().splitlines()) == 1


def test_values_that_make_no_sense_are_listed_together(capsys, tmp_path, tiny_lm, tiny_vision,
                                                       shapes_data):
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     "train.lr=-1", "train.lora.r=0", "train.max_steps=-1", "train.epochs=0",
                     "train.warmup_ratio=1", "train.batch_size=0"],
            "config problems in", "train.lr=-1.0 must be above 0",
            "train.lora.r=0 must be at least 1", "train.max_steps=-1 must be at least 1",
            "train.epochs=0.0 must be above 0", "train.warmup_ratio=1.0 must be in [0, 1)",
            "train.batch_size=0 must be at least 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_vision_weights_corrupt(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data, damage):
    weights = tmp_path / "vit.safetensors"
    good = tiny_vision[1].read_bytes()
    weights.write_bytes(b"\x00garbage" * 100 if damage == "garbage" else good[:len(good) // 2])
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"model.vision.pretrained={weights}"],
            str(weights), "not a readable safetensors file", "copy or export it again")
    assert not (tmp_path / "run").exists()


def test_vision_weights_holding_a_pickle(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data):
    marker = tmp_path / "payload-ran"
    weights = tmp_path / "vit.bin"
    torch.save({"visual.conv1.weight": torch.zeros(1), "x": Payload(marker)}, weights)
    err = refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                           f"model.vision.pretrained={weights}"],
                  str(weights), "pickled objects other than tensors", "refuses to load it",
                  "safetensors")
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, finished_lora) -> Path:
    """A plain transformers Llama folder (the LoRA run's merged LLM)."""
    out = tmp_path_factory.mktemp("llama") / "llm"
    assert main(["export", str(finished_lora), str(out), "--format", "llm"]) == 0
    return out


@pytest.mark.parametrize("layout", ["internlm2", "llama"])
@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_llm_weights_damaged(capsys, tmp_path, tiny_lm, tiny_vision, shapes_data, llama_folder,
                             layout, damage):
    llm = Path(shutil.copytree(tiny_lm if layout == "internlm2" else llama_folder,
                               tmp_path / "llm"))
    file = llm / "model.safetensors"
    if damage == "pickle":
        file.unlink()
        file = llm / "pytorch_model.bin"
        torch.save({"model.embed_tokens.weight": torch.zeros(1), "x": Payload(tmp_path / "ran")},
                   file)
        words = ["pickled objects other than tensors", "refuses to load it"]
    else:
        file.write_bytes(file.read_bytes()[:-64])
        words = ["not a readable safetensors file", "copy or export it again"]
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run"),
                     f"model.llm={llm}"], str(file), *words)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()


def test_init_from_a_run_with_another_projector_depth(capsys, tmp_path, finished, tiny_lm,
                                                      tiny_vision, shapes_data):
    before = snapshot(finished)
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "run",
                                    "train.max_steps=1"),
                     f"init_from={finished}", "model.projector_depth=1"],
            str(finished / "projector"), "has depth 2", "model.projector_depth=1",
            "set model.projector_depth=2")
    assert snapshot(finished) == before
    assert not (tmp_path / "run").exists()  # no empty folder left behind


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="config file"):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])


# --------------------------------------------------------------------------- broken run dirs


def chat_eval_export(run: Path, shapes_data: Path, tmp_path: Path) -> list[list]:
    """The three commands that load a run, as argv lists."""
    return [["chat", run, "--question", "What shape is this?", "--max-new-tokens", "2"],
            ["eval", run, "--data", shapes_data / "heldout.json", "--image-folder",
             shapes_data / "images", "--max-new-tokens", "2"],
            ["export", run, tmp_path / "exported", "--format", "llm"]]


@pytest.mark.parametrize("part", ["projector", "llm_adapter"])
def test_run_missing_a_weight_folder(capsys, tmp_path, copy_of, finished, finished_lora,
                                     shapes_data, part):
    run = copy_of(finished if part == "projector" else finished_lora)
    shutil.rmtree(run / part)
    before = snapshot(run)
    for argv in chat_eval_export(run, shapes_data, tmp_path):
        if part == "llm_adapter" and argv[0] == "eval":
            argv[argv.index("--data") + 1] = shapes_data / "text.json"
        refused(capsys, argv, f"{run} is missing {part}/", "restore the folder", "train again")
    assert snapshot(run) == before and not (tmp_path / "exported").exists()


def test_killed_run_without_final_weights(capsys, tmp_path, copy_of, finished, shapes_data):
    run = copy_of(finished)
    for name in ("COMPLETE", "projector", "loss.png"):  # as a kill after step 2's checkpoint
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    before = snapshot(run)
    checkpoint = run / "checkpoints" / "step-0000002"
    for argv in chat_eval_export(run, shapes_data, tmp_path):
        refused(capsys, argv, f"{run} holds no finished run", f"newest checkpoint is {checkpoint}",
                f"llava-tune train {run / 'config.yaml'} train.resume=true",
                "load that checkpoint folder")
    assert snapshot(run) == before and not (tmp_path / "exported").exists()
    # What the message offers works: the checkpoint loads.
    code, _, err = run_cli(capsys, "chat", checkpoint, "--question", "What shape is this?",
                           "--max-new-tokens", "2")
    assert code == 0, err


def test_init_from_a_killed_run(capsys, tmp_path, copy_of, finished, tiny_lm, tiny_vision,
                                shapes_data):
    run = copy_of(finished)
    (run / "COMPLETE").unlink()
    refused(capsys, [*pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "next"),
                     f"init_from={run}"], f"{run} holds no finished run", "train.resume=true")


def test_run_config_yaml_damaged(capsys, tmp_path, copy_of, finished, shapes_data):
    run = copy_of(finished)
    (run / "config.yaml").write_text("stage: pretrain\nmodel: [unclosed\n")
    before = snapshot(run)
    for argv in chat_eval_export(run, shapes_data, tmp_path):
        err = refused(capsys, argv, str(run / "config.yaml"), "not valid YAML (line 3, column 1",
                      "restore config.yaml")
        assert len(err.strip().splitlines()) == 1
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickle"])
def test_run_projector_weights_damaged(capsys, tmp_path, copy_of, finished, shapes_data, damage):
    run = copy_of(finished)
    file = run / "projector" / "model.safetensors"
    if damage == "pickle":
        file.unlink()
        file = run / "projector" / "pytorch_model.bin"
        torch.save({"model.0.weight": torch.zeros(1), "x": Payload(tmp_path / "ran")}, file)
        words = ["pickled objects other than tensors", "refuses to load it"]
    else:
        data = file.read_bytes()
        file.write_bytes(b"{garbage" * 64 if damage == "garbage" else data[:len(data) - 100])
        words = ["not a readable safetensors file", "copy or export it again"]
    for argv in chat_eval_export(run, shapes_data, tmp_path):
        refused(capsys, argv, str(file), *words)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_run_adapter_damaged(capsys, tmp_path, copy_of, finished_lora, shapes_data, damage):
    run = copy_of(finished_lora)
    name = "adapter_model.safetensors" if damage == "weights" else "adapter_config.json"
    file = run / "llm_adapter" / name
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
    words = (["not a readable safetensors file"] if damage == "weights" else
             ["adapter config", "not valid JSON", "restore the folder"])
    for argv in chat_eval_export(run, shapes_data, tmp_path):
        if argv[0] == "eval":
            argv[argv.index("--data") + 1] = shapes_data / "text.json"
        refused(capsys, argv, str(file), *words)


def test_train_into_a_finished_run(capsys, tmp_path, copy_of, finished, tiny_lm, tiny_vision,
                                   shapes_data):
    run = copy_of(finished)
    before = snapshot(run)
    refused(capsys, pretrain_argv(tiny_lm, tiny_vision, shapes_data, run, "train.max_steps=1"),
            f"{run} already holds a finished run", "train.resume=true", "--overwrite",
            "another run_dir")
    assert snapshot(run) == before and not (run / ".lock").exists()


def test_train_into_another_runs_checkpoints(capsys, tmp_path, copy_of, finished, tiny_lm,
                                             tiny_vision, shapes_data):
    run = copy_of(finished)
    for name in ("COMPLETE", "projector"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    before = snapshot(run)
    refused(capsys, pretrain_argv(tiny_lm, tiny_vision, shapes_data, run, "train.max_steps=1"),
            "the checkpoints of another run (newest step-0000002)", "train.resume=true",
            "--overwrite")
    assert snapshot(run) == before


def test_resume_without_a_checkpoint(capsys, tmp_path, copy_of, finished, tiny_lm, tiny_vision,
                                     shapes_data):
    run = copy_of(finished)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)  # metrics.jsonl among them: not truncated
    refused(capsys, pretrain_argv(tiny_lm, tiny_vision, shapes_data, run, "train.max_steps=1",
                                  "train.resume=true"),
            "train.resume=true", f"{run / 'checkpoints'} holds no checkpoint",
            "train.save_every=N", "without train.resume")
    assert snapshot(run) == before
    refused(capsys, pretrain_argv(tiny_lm, tiny_vision, shapes_data, tmp_path / "new",
                                  "train.resume=true"), "holds no checkpoint")
    assert not (tmp_path / "new").exists()


def test_overwrite_keeps_the_users_own_files(capsys, tmp_path, copy_of, finished, tiny_lm,
                                             tiny_vision, shapes_data):
    run = copy_of(finished)
    (run / "notes.txt").write_text("my notes")
    (run / "heldout_predictions.jsonl").write_text("{}\n")
    old_projector = (run / "projector" / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, *pretrain_argv(tiny_lm, tiny_vision, shapes_data, run,
                                                  "train.max_steps=1", "train.lr=0.5"),
                           "--overwrite")
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "my notes"
    assert (run / "heldout_predictions.jsonl").read_text() == "{}\n"
    assert (run / "projector" / "model.safetensors").read_bytes() != old_projector
    assert not (run / "checkpoints").exists()  # the old run's, removed; this one saved none
    assert [json.loads(line)["step"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_train_into_a_folder_with_someone_elses_config(capsys, tmp_path, tiny_lm, tiny_vision,
                                                       shapes_data):
    """`train exp/config.yaml run_dir=exp`: the user's own config.yaml is never overwritten."""
    folder = tmp_path / "exp"
    folder.mkdir()
    config = folder / "config.yaml"
    config.write_text("# my experiment\n" + (DEMO / "pretrain.yaml").read_text())
    before = snapshot(folder)
    for extra in ([], ["--overwrite"]):
        refused(capsys, ["train", config, *overrides("pretrain", tiny_lm, tiny_vision,
                                                     shapes_data, folder), *extra],
                f"run_dir {folder} holds config.yaml", "no llava-tune training wrote",
                f"choose another run_dir, e.g. {folder / 'run'}")
        assert snapshot(folder) == before


def test_stale_checkpoint_temp_folders_are_removed(capsys, tmp_path, copy_of, finished, tiny_lm,
                                                   tiny_vision, shapes_data):
    run = copy_of(finished)
    checkpoints = run / "checkpoints"
    for name in ("COMPLETE", "projector"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    # A kill while step 3's checkpoint was written, one while the projector was replaced (after
    # the old one was renamed aside), and files that are not ours.
    (checkpoints / ".step-0000003.tmp-k1ll3d_x").mkdir()
    (checkpoints / ".step-0000003.tmp-k1ll3d_x" / "trainable.safetensors").write_bytes(b"half")
    (run / ".metrics.jsonl.a1b2c3d4.tmp").write_text("half")
    shutil.copytree(finished / "projector", run / ".projector.old-zz9" / "projector")
    (checkpoints / ".my-hidden-notes.tmp-keep").write_text("mine")
    (run / ".env.tmp").write_text("mine")
    code, _, err = run_cli(capsys, *pretrain_argv(tiny_lm, tiny_vision, shapes_data, run,
                                                  "train.max_steps=3", "train.save_every=1",
                                                  "train.resume=true"))
    assert code == 0, err
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".my-hidden-notes.tmp-keep", "step-0000002", "step-0000003"]
    assert not (run / ".metrics.jsonl.a1b2c3d4.tmp").exists()
    assert not (run / ".projector.old-zz9").exists()
    assert (run / ".env.tmp").read_text() == "mine"
    assert [json.loads(line)["step"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_interrupted_replace_puts_the_previous_folder_back(tmp_path, copy_of, finished):
    run = copy_of(finished)
    projector = snapshot(run / "projector")
    aside = run / ".projector.old-abc123"
    aside.mkdir()
    (run / "projector").rename(aside / "projector")
    rundir.remove_stale_temp(run)
    assert snapshot(run / "projector") == projector and not aside.exists()


def test_damaged_checkpoint_on_resume(capsys, tmp_path, copy_of, finished, tiny_lm, tiny_vision,
                                      shapes_data):
    run = copy_of(finished)
    shutil.rmtree(run / "projector")
    (run / "COMPLETE").unlink()
    checkpoint = run / "checkpoints" / "step-0000002"
    (checkpoint / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    refused(capsys, pretrain_argv(tiny_lm, tiny_vision, shapes_data, run, "train.max_steps=3",
                                  "train.resume=true"),
            f"checkpoint {checkpoint} is damaged", f"delete {checkpoint}")
    assert not (run / ".lock").exists()


def test_eval_out_is_checked_before_loading(capsys, tmp_path, finished, shapes_data,
                                            monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model before checking --out")

    monkeypatch.setattr("llava_tune.assembly.model.load_run", no_loading)
    data = shapes_data / "heldout.json"
    base = ["eval", finished, "--data", data, "--image-folder", shapes_data / "images"]
    refused(capsys, [*base, "--out", tmp_path], f"--out {tmp_path} is a directory",
            "give a file name")
    refused(capsys, [*base, "--out", tmp_path / "no" / "p.jsonl"], "does not exist")
    before = data.read_bytes()
    refused(capsys, [*base, "--out", data], "--out, --json and --data must be three different")
    refused(capsys, [*base, "--out", tmp_path / "a.json", "--json", tmp_path / "a.json"],
            "three different files")
    assert data.read_bytes() == before


def test_eval_interrupted_keeps_the_predictions_made(capsys, tmp_path, finished, shapes_data,
                                                    monkeypatch):
    real = evaluate_module.generate_batch
    calls = []

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_batch", interrupted_on_the_second_batch)
    out = tmp_path / "preds.jsonl"
    code, _, err = run_cli(capsys, "eval", finished, "--data", shapes_data / "heldout.json",
                           "--image-folder", shapes_data / "images", "--out", out,
                           "--batch-size", "3", "--max-new-tokens", "2")
    assert code == 130 and "Traceback" not in err
    assert f"the predictions made so far are in {out}.partial" in err
    rows = [json.loads(line) for line in Path(f"{out}.partial").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records(shapes_data, "heldout.json", 3)]
    assert not out.exists()


# --------------------------------------------------------------------------- export targets


def test_export_into_a_non_empty_folder(capsys, tmp_path, finished):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "old-export").mkdir()
    (out / "old-export" / "model.safetensors").write_bytes(b"older")
    before, run_before = snapshot(out), snapshot(finished)
    refused(capsys, ["export", finished, out, "--format", "llm"],
            f"export target {out} is not empty", "choose a new folder", "--force",
            "never deleted")
    assert snapshot(out) == before and snapshot(finished) == run_before


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_export_overlapping_the_run(capsys, tmp_path, copy_of, finished, where):
    run = copy_of(finished)
    out = {"same": run, "inside": run / "export", "parent": tmp_path}[where]
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        refused(capsys, ["export", run, out, "--format", "llm", *extra],
                f"export target {out} overlaps the run {run}", "outside the run dir")
        assert snapshot(tmp_path) == before
    assert not (run / "export").exists()


def test_export_target_is_a_file(capsys, tmp_path, finished):
    out = tmp_path / "model.bin"
    out.write_bytes(b"mine")
    refused(capsys, ["export", finished, out, "--format", "llm", "--force"],
            f"export target {out} is a file", "give a folder")
    assert out.read_bytes() == b"mine"


def test_export_force_moves_other_contents_aside(capsys, tmp_path, finished):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "export", finished, out, "--format", "llm", "--force")
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert f"the previous contents of {out} are now in {aside[0]}" in err
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    # Again: the export it wrote is its own, replaced without moving anything aside.
    code, _, err = run_cli(capsys, "export", finished, out, "--format", "llm", "--force")
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir() if ".replaced-" in p.name] == [aside[0].name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mine", aside[0].name])
    # A file added to an export makes it the user's: moved aside as a whole, kept.
    (out / "README.md").write_text("about this model")
    code, _, err = run_cli(capsys, "export", finished, out, "--format", "llm", "--force")
    assert code == 0, err
    aside = sorted(p for p in tmp_path.iterdir() if p.name.startswith("mine.replaced-"))
    assert len(aside) == 2 and (aside[1] / "README.md").read_text() == "about this model"


def test_failed_export_leaves_the_target_as_it_was(capsys, tmp_path, finished_lora):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    refused(capsys, ["export", finished_lora, out, "--format", "hf-llava", "--force"],
            "text-only run", "--format llm")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left


def test_export_of_an_unfinished_run(capsys, tmp_path, copy_of, finished):
    run = copy_of(finished)
    (run / "COMPLETE").unlink()
    refused(capsys, ["export", run, tmp_path / "out", "--format", "xtuner"],
            "holds no finished run")
    assert not (tmp_path / "out").exists()


def test_full_disk_is_a_message_other_os_errors_keep_their_traceback(capsys, tmp_path, finished,
                                                                       monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr("llava_tune.export.export", full)
    refused(capsys, ["export", finished, tmp_path / "out", "--format", "llm"],
            "No space left on device", str(tmp_path / "out"), "free space")

    def bug(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr("llava_tune.export.export", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["export", str(finished), str(tmp_path / "out"), "--format", "llm"])


# --------------------------------------------------------------------------- concurrency


def test_training_refused_while_another_holds_the_lock(capsys, tmp_path, tiny_lm, tiny_vision,
                                                       shapes_data):
    run = tmp_path / "run"
    holder = rundir.RunLock(run)
    holder.acquire()
    try:
        refused(capsys, pretrain_argv(tiny_lm, tiny_vision, shapes_data, run),
                f"another training (pid {os.getpid()} on", f"is running in {run}",
                "wait for it", "choose another run_dir")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.release()
    assert not run.exists() or not any(run.iterdir())


def test_stale_lock_of_a_dead_process_is_taken_over(capsys, tmp_path, tiny_lm, tiny_vision,
                                                    shapes_data):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    code, _, err = run_cli(capsys, *pretrain_argv(tiny_lm, tiny_vision, shapes_data, run,
                                                  "train.max_steps=1"))
    assert code == 0, err
    assert (run / "COMPLETE").is_file() and not (run / ".lock").exists()


def cli_process(argv: list, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "llava_tune", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=kwargs.pop("cwd", REPO), **kwargs)


@pytest.mark.slow
def test_two_trainings_started_at_once(tmp_path, tiny_lm, tiny_vision, shapes_data):
    run = tmp_path / "run"
    argv = pretrain_argv(tiny_lm, tiny_vision, shapes_data, run, "train.max_steps=12")
    procs = [cli_process(argv), cli_process(argv)]
    results = [(p.pid, p.wait(timeout=600), *p.communicate()) for p in procs]
    assert sorted(code for _, code, _, _ in results) == [0, 2], results
    (winner, _, _, _), = [r for r in results if r[1] == 0]
    (_, _, out, err), = [r for r in results if r[1] == 2]
    assert "Traceback" not in out + err
    # The loser either meets the winner's lock or, when its start-up took longer than the
    # winner's 12 steps (CI's faster machine did), the winner's finished run: both refusals
    # leave the run alone. (test_training_refused_while_another_holds_the_lock pins the first.)
    racing = "error: another training (pid " in err and f"(pid {winner} on" in err \
        and f"is running in {run}" in err
    finished = f"error: {run} already holds a finished run" in err
    assert racing or finished, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert (run / "COMPLETE").is_file() and not (run / ".lock").exists()


# --------------------------------------------------------------------------- interruption


def ctrl_c_at(step: int, monkeypatch):
    """Make the training loop's events send this process a real SIGINT once `step` is logged,
    as Ctrl-C in a terminal would (the loop handles it at the next step boundary)."""
    real_fit = loop_module.fit

    def fit(run, on_event):
        def hook(event):
            on_event(event)
            if isinstance(event, Logged) and event.step == step:
                os.kill(os.getpid(), signal.SIGINT)

        return real_fit(run, hook)

    monkeypatch.setattr(loop_module, "fit", fit)


def projector_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "projector" / "model.safetensors")


def test_ctrl_c_writes_a_checkpoint_and_the_resume_command_resumes(
        capsys, tmp_path, tiny_lm, tiny_vision, shapes_data, monkeypatch):
    extra = ("train.max_steps=6", "train.save_every=4", "train.lr=1e-2")
    straight = tmp_path / "straight"
    assert run_cli(capsys, *pretrain_argv(tiny_lm, tiny_vision, shapes_data, straight,
                                          *extra))[0] == 0
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        ctrl_c_at(2, patch)
        code, out, err = run_cli(capsys, *pretrain_argv(tiny_lm, tiny_vision, shapes_data, run,
                                                        *extra))
    assert code == 130 and "Traceback" not in out + err
    checkpoint = run / "checkpoints" / "step-0000002"  # between save_every's steps
    command = f"llava-tune train {run / 'config.yaml'} train.resume=true"
    assert f"[interrupted] at step 2: checkpoint {checkpoint} written; continue with:\n  " \
           f"{command}\n" in err
    assert not (run / "COMPLETE").exists() and not (run / ".lock").exists()
    rundir_files = snapshot(run)
    refused(capsys, ["chat", run, "--question", "hi"], "holds no finished run", command)
    assert snapshot(run) == rundir_files

    # The printed command, run from another directory, resumes the run with every override.
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)
    assert argv[0] == "llava-tune"
    code, _, err = run_cli(capsys, *argv[1:])
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    a, b = projector_weights(straight), projector_weights(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_without_save_every_says_there_is_no_checkpoint(capsys, tmp_path, tiny_lm,
                                                               tiny_vision, shapes_data,
                                                               monkeypatch):
    run = tmp_path / "run"
    ctrl_c_at(1, monkeypatch)
    code, out, err = run_cli(capsys, *pretrain_argv(tiny_lm, tiny_vision, shapes_data, run,
                                                    "train.max_steps=5"))
    assert code == 130 and "Traceback" not in out + err
    assert "[interrupted] at step 1: no checkpoint was written (train.save_every is not set)" \
        in err
    assert "start it again with the same command" in err
    assert not (run / "checkpoints").exists() and not (run / "COMPLETE").exists()
    assert not (run / ".lock").exists()
    # Started again with the same command, as the message says: no --overwrite needed.
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *pretrain_argv(tiny_lm, tiny_vision, shapes_data, run,
                                                  "train.max_steps=2"))
    assert code == 0, err


@pytest.mark.slow
def test_sigint_to_a_training_process_then_resume(tmp_path, tiny_lm, tiny_vision, shapes_data):
    """A real process and a real SIGINT, as from a terminal; then the printed command."""
    extra = ("train.max_steps=40", "train.save_every=100", "train.lr=1e-2")
    straight = tmp_path / "straight"
    proc = cli_process(pretrain_argv(tiny_lm, tiny_vision, shapes_data, straight, *extra))
    assert proc.wait(timeout=600) == 0, proc.communicate()[1][-3000:]
    run = tmp_path / "run"
    proc = cli_process(pretrain_argv(tiny_lm, tiny_vision, shapes_data, run, *extra))
    wait_for_logged_steps(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    line = next(line for line in err.splitlines() if line.startswith("[interrupted] at step "))
    step = int(line.split()[3].rstrip(":"))
    assert 3 <= step < 40
    assert f"checkpoint {run / 'checkpoints' / f'step-{step:07d}'} written" in line
    command = err.split("continue with:\n")[1].splitlines()[0].strip()
    assert command == f"llava-tune train {run / 'config.yaml'} train.resume=true"
    again = cli_process(shlex.split(command)[1:], cwd=tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    a, b = projector_weights(straight), projector_weights(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_ctrl_c_under_torchrun_then_resume(tmp_path, tiny_lm, shapes_data):
    """Ctrl-C in a terminal signals torchrun's process group; torchrun passes it on to its
    workers (in sessions of their own), which stop together at a step boundary with a
    checkpoint; the printed torchrun command resumes the run."""
    run = tmp_path / "run"
    args = ["train", DEMO / "sft.yaml",
            *overrides("sft", tiny_lm, None, shapes_data, run, "data.pack=false",
                       "train.max_steps=60", "train.save_every=1000", "train.batch_size=2")]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))

    def launch(argv: list) -> subprocess.Popen:
        return subprocess.Popen([*map(str, argv)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    proc = launch([*torchrun, "--standalone", "--nproc_per_node", "2", "-m", "llava_tune",
                   "--quiet", *args])
    wait_for_logged_steps(proc, run, 3)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the whole process group
    _, err = proc.communicate(timeout=300)
    line = next((line for line in err.splitlines() if line.startswith("[interrupted] at step ")),
                None)
    assert line is not None, f"exit {proc.returncode}; stderr:\n{err[-3000:]}"
    step = int(line.split()[3].rstrip(":"))
    assert f"checkpoint {run / 'checkpoints' / f'step-{step:07d}'} written" in line
    assert err.count("[interrupted]") == 1
    command = err.split("continue with:\n")[1].splitlines()[0].strip()
    assert command == (f"torchrun --standalone --nproc_per_node 2 -m llava_tune train "
                       f"{run / 'config.yaml'} train.resume=true")
    again = launch([*torchrun, *shlex.split(command)[1:]])
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert (run / "COMPLETE").is_file() and not (run / ".lock").exists()
