"""`llava-tune configs` (list the shipped recipes) and `configs copy NAME DEST` (a recipe to edit,
its paths as placeholders), and `train`'s refusal of a copy whose placeholders are unfilled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from llava_tune import recipes
from llava_tune.cli import main
from llava_tune.config import load_config
from llava_tune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                 for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "accelerate")


def flat(data: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# --------------------------------------------------------------------------- list


def test_list_shows_every_recipe_with_stage_trains_and_memory(capsys):
    code, out, _ = run_cli(capsys, "configs")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "STAGE", "TRAINS", "MEMORY"]
    rows = {line.split()[0]: line for line in lines[1:1 + len(SHIPPED)]}
    assert sorted(rows) == SHIPPED and "accelerate/multi_gpu" not in out
    cells = {name: [c for c in line.split("  ") if c.strip()] for name, line in rows.items()}
    assert [c.strip() for c in cells["internlm2_chat_1_8b/finetune"]] == [
        "internlm2_chat_1_8b/finetune", "internlm2-chat-1_8b (4bit) + ViT-L-14-336-quickgelu",
        "finetune", "projector, LLM (QLoRA), vision tower (LoRA)", "~7.8 GB"]
    assert [c.strip() for c in cells["internlm2_chat_7b/pretrain"]][2:] == [
        "pretrain", "projector", "~8.3 GB"]
    assert [c.strip() for c in cells["internlm2_chat_7b/sft"]][1:4] == [
        "internlm2-chat-7b (4bit)", "sft", "LLM (QLoRA)"]
    assert [c.strip() for c in cells["demo/lm"]][2:] == ["sft", "LLM (full)", "CPU, < 2 GB"]
    assert [c.strip() for c in cells["demo/sft"]][3] == "LLM (LoRA)"
    assert "llava-tune configs copy NAME DEST.yaml" in out
    assert main(["configs", "list"]) == 0 and capsys.readouterr().out == out


def test_what_trains_follows_train_llm_and_train_vision(tmp_path, monkeypatch):
    config = load_config(REPO / "configs" / "demo" / "finetune.yaml",
                         ["train.vision=lora", "train.llm=full", "model.quantization=null"])
    recipe = recipes.Recipe("x", tmp_path, config, "?")
    assert recipe.trains == "projector, LLM (full), vision tower (LoRA)"
    config = load_config(REPO / "configs" / "demo" / "pretrain.yaml", ["train.vision=full"])
    assert recipes.Recipe("x", tmp_path, config, "?").trains == "projector, vision tower (full)"


def test_memory_table_is_estimate_memorys_totals():
    """configs/memory.json holds scripts/estimate_memory.py's totals for every real recipe."""
    from estimate_memory import estimate  # torch and transformers: imported here, when needed

    table = json.loads((REPO / "configs" / "memory.json").read_text())
    real = [name for name in SHIPPED if name.startswith("internlm2_chat_")]
    assert real and set(real) <= set(table)
    for name in real:
        total = estimate(REPO / "configs" / f"{name}.yaml")["total"]
        assert table[name] == round(total, 1), name
    assert set(table) - {"about"} <= set(SHIPPED)


# --------------------------------------------------------------------------- copy


def test_copy_writes_the_recipe_with_placeholders(tmp_path, capsys):
    dest = tmp_path / "my_finetune.yaml"
    code, out, _ = run_cli(capsys, "configs", "copy", "internlm2_chat_1_8b/finetune", dest)
    assert code == 0
    source = REPO / "configs" / "internlm2_chat_1_8b" / "finetune.yaml"
    original, copied = flat(yaml.safe_load(source.read_text())), flat(yaml.safe_load(
        dest.read_text()))
    assert copied.keys() == original.keys()
    changed = {key for key in original if copied[key] != original[key]}
    assert changed == {"model.llm", "model.vision.pretrained", "data.train", "data.image_folder",
                       "data.cache_dir", "init_from", "run_dir"}
    assert copied["model.llm"] == "<path to internlm2-chat-1_8b>"
    assert copied["model.vision.pretrained"] == "<path to clip-vit-large-patch14-336>"
    assert copied["data.train"] == "<path to llava_v1_5_mix665k.json>"
    assert all(recipes.is_placeholder(copied[key]) for key in changed)
    # The recipe's comments are kept, a header says what to do.
    text = dest.read_text()
    assert "# XTuner uses 512/256" in text and "# HF CLIP folder, or an open_clip" in text
    assert text.startswith("# Copied from llava-tune's recipe internlm2_chat_1_8b/finetune")
    assert f"llava-tune train {dest}" in text
    for key in changed:
        assert f"  {key}: {copied[key]}" in out
    # Into a folder: named after the recipe; a configs/ path and .yaml work as the name.
    code, out, _ = run_cli(capsys, "configs", "copy", "configs/demo/pretrain.yaml", tmp_path)
    assert code == 0 and (tmp_path / "demo_pretrain.yaml").is_file()
    demo = flat(yaml.safe_load((tmp_path / "demo_pretrain.yaml").read_text()))
    assert demo["model.vision.config_file"] == "<path to demo-vit.json>"
    assert demo["model.vision.name"] == "demo-vit" and demo["train.lr"] == 2.0e-3


def test_copy_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    dest.write_text("stage: pretrain  # my edits\n")
    code, out, err = run_cli(capsys, "configs", "copy", "demo/finetune", dest)
    assert code == 2 and err.startswith("error: ") and str(dest) in err
    assert "already exists" in err and "Traceback" not in err
    assert dest.read_text() == "stage: pretrain  # my edits\n"
    (tmp_path / "demo_finetune.yaml").write_text("x: 1\n")
    code, _, err = run_cli(capsys, "configs", "copy", "demo/finetune", tmp_path)
    assert code == 2 and "demo_finetune.yaml already exists" in err
    assert (tmp_path / "demo_finetune.yaml").read_text() == "x: 1\n"


def test_copy_unknown_name_or_missing_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, "configs", "copy", "internlm2_chat_1_8b/finetun",
                           tmp_path / "x.yaml")
    assert code == 2 and "did you mean internlm2_chat_1_8b/finetune?" in err
    assert "demo/lm" in err
    code, _, err = run_cli(capsys, "configs", "copy", "demo/lm", tmp_path / "no" / "x.yaml")
    assert code == 2 and f"folder {tmp_path / 'no'} does not exist" in err
    assert not (tmp_path / "x.yaml").exists() and not (tmp_path / "no").exists()


def test_flow_style_yaml_keeps_its_content():
    text = "stage: pretrain\nmodel: {llm: models/a-llm, quantization: 4bit}\nrun_dir: runs/r\n"
    edited, replaced = recipes.with_placeholders(text)
    assert replaced == {"model.llm": "<path to a-llm>",
                        "run_dir": "<path to a new run dir, e.g. runs/r>"}
    assert yaml.safe_load(edited) == {"stage": "pretrain", "run_dir": replaced["run_dir"],
                                      "model": {"llm": "<path to a-llm>", "quantization": "4bit"}}


# --------------------------------------------------------------------------- train


def test_train_names_every_unfilled_placeholder(tmp_path, capsys, tiny_lm):
    dest = tmp_path / "ft.yaml"
    assert main(["configs", "copy", "demo/finetune", str(dest)]) == 0
    # Two filled on the command line; the rest are named, each with what to put there.
    code, out, err = run_cli(capsys, "train", dest, f"model.llm={tiny_lm}",
                             f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "Traceback" not in err
    assert err.count("error: ") == 1
    assert f"{dest} still has 5 placeholders to fill in:" in err
    lines = err.splitlines()
    expected = {"init_from", "model.vision.pretrained", "model.vision.config_file", "data.train",
                "data.image_folder"}
    named = {line.split(":")[0].strip() for line in lines[1:6]}
    assert named == expected
    assert "model.llm" not in err and "  run_dir" not in err
    line = next(line for line in lines if line.startswith("  data.train:"))
    assert "<path to finetune.json>" in line and "JSON or JSONL" in line
    assert not (tmp_path / "run").exists()


def test_a_filled_copy_has_no_placeholders_left(tmp_path, stage_overrides):
    dest = tmp_path / "ft.yaml"
    recipes.copy_recipe("demo/finetune", dest)
    with pytest.raises(UserError, match="7 placeholders"):
        recipes.check_placeholders(load_config(dest))
    config = load_config(dest, [*stage_overrides("finetune"), "init_from=null"])
    assert recipes.unfilled_placeholders(config) == {}
    recipes.check_placeholders(config)


@pytest.mark.parametrize("name", sorted(recipes.recipe_files()))
def test_a_copy_does_not_say_a_script_sets_its_paths(tmp_path, name):
    """The shipped recipes say which script fills in their paths; a copy's paths are
    placeholders for the user, so it must not repeat that."""
    source = recipes.find_recipe(name).read_text()
    dest, _ = recipes.copy_recipe(name, tmp_path / "copy.yaml")
    text = dest.read_text()
    if "scripts/" in source and ".sh" in source:
        assert re.search(r"scripts/\S+\.sh", source)
    assert re.search(r"scripts/\S+\.sh", text) is None, text[:400]
    assert "Fill in every <...> placeholder" in text
    # Only that line goes: the recipe's settings are the same.
    assert yaml.safe_load(text).keys() == yaml.safe_load(source).keys()
