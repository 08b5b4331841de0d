"""load_config: YAML + key=value overrides, typed values, every problem reported at once."""

from __future__ import annotations

import re

import pytest

from llava_tune.config import Config, load_config, parse_overrides, valid_keys
from llava_tune.constants import STAGES, TRAIN_MODES
from llava_tune.errors import UserError

BASE = """\
stage: finetune
run_dir: runs/ft
model:
  llm: /models/internlm2-chat-1_8b
  quantization: 4bit
  vision:
    name: ViT-L-14-336-quickgelu
data:
  train: data/finetune.json
  max_length: 1024
train:
  llm: lora
  lora:
    r: 16
  lr: 2.0e-4
  batch_size: 4
"""

REQUIRED = ["model.llm=/m", "data.train=d.json", "run_dir=r"]


@pytest.fixture
def base_yaml(tmp_path):
    path = tmp_path / "finetune.yaml"
    path.write_text(BASE)
    return path


def test_yaml_values_and_defaults(base_yaml):
    config = load_config(base_yaml)
    assert isinstance(config, Config)
    assert config.stage == "finetune"
    assert config.model.llm == "/models/internlm2-chat-1_8b"
    assert config.model.quantization == "4bit"
    assert config.model.vision.name == "ViT-L-14-336-quickgelu"
    assert config.model.vision.feature_layer == -2  # default kept
    assert config.data.max_length == 1024
    assert config.train.lora.r == 16
    assert config.train.lora.alpha == 16  # default kept beside a set sibling
    assert config.train.lr == pytest.approx(2e-4) and isinstance(config.train.lr, float)
    assert config.train.batch_size == 4
    assert config.train.epochs == 1.0


def test_overrides_nested_and_typed(base_yaml):
    config = load_config(base_yaml, [
        "train.lr=1e-3", "train.lora.r=8", "model.vision.name=tiny-vit", "train.max_steps=5",
        "model.quantization=null", "train.gradient_checkpointing=true", "train.epochs=2",
        "model.system=You are helpful.", "train.lora.target_modules=[q_proj, v_proj]",
    ])
    assert config.train.lr == 1e-3 and type(config.train.lr) is float
    assert config.train.lora.r == 8
    assert config.model.vision.name == "tiny-vit"
    assert config.train.max_steps == 5 and type(config.train.max_steps) is int
    assert config.model.quantization is None
    assert config.train.gradient_checkpointing is True
    assert config.train.epochs == 2.0 and type(config.train.epochs) is float
    assert config.model.system == "You are helpful."
    assert config.train.lora.target_modules == ["q_proj", "v_proj"]
    # Overrides do not disturb the rest of the file.
    assert config.train.batch_size == 4 and config.data.max_length == 1024


def test_override_without_file_and_value_with_equals_sign():
    config = load_config(None, REQUIRED + ["model.system=a=b"])
    assert config.model.system == "a=b"
    assert config.run_dir == "r"


def test_parse_overrides():
    assert parse_overrides(["a.b=1e-4", "c=3", "d=yes please", "e=", "f=[1, 2]"]) == [
        ("a.b", 1e-4), ("c", 3), ("d", "yes please"), ("e", None), ("f", [1, 2])]
    with pytest.raises(UserError, match=r"'train\.lr' is not key=value"):
        parse_overrides(["train.lr"])


def test_unknown_key_lists_valid_keys(base_yaml):
    base_yaml.write_text(BASE + "  lrr: 1.0e-3\n")  # under train:
    with pytest.raises(UserError) as err:
        load_config(base_yaml)
    message = str(err.value)
    assert "unknown key train.lrr" in message
    assert str(base_yaml) in message
    listed = message.split("valid keys: ", 1)[1].split(", ")
    assert listed == valid_keys(Config)
    for key in ("train.lr", "train.lora.r", "model.vision.name", "data.max_bad_fraction", "stage"):
        assert key in listed


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  llm: /m\n  visoin:\n    name: x\n")
    with pytest.raises(UserError, match="unknown key model.visoin"):
        load_config(path, ["data.train=d", "run_dir=r"])


def test_all_problems_reported_together(base_yaml):
    with pytest.raises(UserError) as err:
        load_config(base_yaml, ["train.bogus=1", "train.batch_size=big", "stage=pretrian",
                                "train.mixed_precision=fp8", "data.max_length=4"])
    lines = str(err.value).splitlines()
    problems = [line.strip() for line in lines if line.startswith("  ")]
    assert any(p.startswith("override 'train.bogus=1': unknown key 'bogus' in train")
               for p in problems)
    assert "train.batch_size='big' is not of type int" in problems
    assert any(p.startswith("stage='pretrian'") and "pretrain, finetune, sft" in p for p in problems)
    assert any(p.startswith("train.mixed_precision='fp8'") for p in problems)
    assert "data.max_length=4 must be at least 8" in problems
    assert len(problems) == 5


def test_missing_required_values_all_named():
    with pytest.raises(UserError) as err:
        load_config(None, [])
    message = str(err.value)
    for key in ("model.llm is not set", "data.train is not set", "run_dir is not set"):
        assert key in message


@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=2.5", "train.batch_size=2.5 is not of type int"),
    ("train.lr=fast", "train.lr='fast' is not of type float"),
    ("train.epochs=true", "train.epochs=True is not of type float"),
    ("train.gradient_checkpointing=3", "train.gradient_checkpointing=3 is not of type bool"),
    ("train.lora.r=[1]", "train.lora.r=[1] is not of type int"),
    ("train.lora.target_modules=[1, 2]", "train.lora.target_modules=[1, 2] is not of type"),
    ("model.vision=tiny", "model.vision must be a mapping"),
])
def test_type_errors_name_the_key(override, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_config(None, REQUIRED + [override])


def test_full_training_of_quantized_llm_is_refused(base_yaml):
    with pytest.raises(UserError, match=r"train\.llm=full cannot train a quantized LLM"):
        load_config(base_yaml, ["train.llm=full"])  # the file says quantization: 4bit
    with pytest.raises(UserError, match=r"train\.llm=full cannot train a quantized LLM"):
        load_config(base_yaml, ["train.llm=full", "model.quantization=8bit"])
    config = load_config(base_yaml, ["train.llm=full", "model.quantization=null"])
    assert config.train.llm == "full" and config.model.quantization is None


def test_bad_enum_values(base_yaml):
    with pytest.raises(UserError, match=r"model\.quantization='3bit'"):
        load_config(base_yaml, ["model.quantization=3bit"])
    with pytest.raises(UserError, match=r"train\.llm='qlora'; use one of frozen, lora, full"):
        load_config(base_yaml, ["train.llm=qlora"])


def test_every_enumerated_key_lists_its_values_in_one_error(base_yaml):
    """The allowed values come from constants.py, the one place that lists them."""
    with pytest.raises(UserError) as err:
        load_config(base_yaml, ["stage=caption", "train.vision=half", "model.quantization=2bit",
                                "train.mixed_precision=fp8"])
    assert str(err.value).splitlines()[1:] == [
        "  stage='caption'; use one of pretrain, finetune, sft, dpo",
        "  model.quantization='2bit'; use one of null, 4bit, 8bit",
        "  train.mixed_precision='fp8'; use one of auto, no, bf16, fp16",
        "  train.vision='half'; use one of frozen, lora, full",
    ]


def test_stage_defaults_are_train_modes():
    for stage in STAGES.values():
        assert stage.llm in TRAIN_MODES and stage.tower in TRAIN_MODES


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match=re.escape(f"config file {missing} not found")):
        load_config(missing)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  llm: [unclosed\n")
    with pytest.raises(UserError, match=re.escape(f"{path} is not valid YAML")):
        load_config(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- stage\n- finetune\n")
    with pytest.raises(UserError, match=re.escape(f"{path} must hold a mapping")):
        load_config(path)


def test_empty_yaml_is_all_defaults_plus_overrides(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    config = load_config(path, REQUIRED)
    assert config.stage == "finetune" and config.train.lr == 2e-4


def test_override_into_a_scalar_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(UserError, match="override train.lr: train is not a section"):
        load_config(path, ["train.lr=1"])


def test_numeric_override_of_a_text_field_stays_text(tmp_path):
    from llava_tune.config import load_config

    config = load_config(None, ["model.llm=lm", "data.train=d.json", "run_dir=2024"])
    assert config.run_dir == "2024"


def test_override_typo_names_the_override_not_the_file(base_yaml):
    with pytest.raises(UserError) as err:
        load_config(base_yaml, ["train.lrr=1e-3"])
    message = str(err.value)
    assert str(base_yaml) not in message  # the file has no problem
    assert message.startswith("config problems in the key=value overrides:")
    line = next(x.strip() for x in message.splitlines() if x.strip().startswith("override"))
    head, valid = line.split("; valid: ")
    assert head == "override 'train.lrr=1e-3': unknown key 'lrr' in train (did you mean train.lr?)"
    assert valid.split(", ") == [k for k in valid_keys(Config) if k.startswith("train.")]
    with pytest.raises(UserError, match=r"override 'modle\.llm=/m': unknown key 'modle' "
                                        r"\(did you mean model\.llm\?\)"):
        load_config(base_yaml, ["modle.llm=/m"])
    # Sections given whole are keys too.
    assert load_config(base_yaml, ["train.lora={r: 8, alpha: 16}"]).train.lora.alpha == 16


def test_compile_of_checkpointed_layers_on_packed_rows_is_refused(base_yaml):
    """A checkpointed layer around the packed rows' eager attention compiles nothing
    (measured): that triple would pay for compilation and train eagerly; any two are fine."""
    both = ["train.compile=true", "train.gradient_checkpointing=true"]
    assert load_config(base_yaml, both).train.compile
    assert load_config(base_yaml, ["train.compile=true", "data.pack=true"]).train.compile
    with pytest.raises(UserError, match="train.compile=true compiles nothing with "
                                        "train.gradient_checkpointing=true and data.pack=true"):
        load_config(base_yaml, [*both, "data.pack=true"])
