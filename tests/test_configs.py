"""Every shipped config loads and validates; the real-size ones describe the models they claim,
checked on the meta device (shapes only, nothing allocated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from llava_tune.config import check_paths, load_config
from llava_tune.constants import STAGES
from llava_tune.convert.internlm2 import internlm2_to_llama_config
from llava_tune.convert.open_clip import create_open_clip
from llava_tune.data.sources import source_problems
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower

REPO = Path(__file__).resolve().parents[1]
# Training configs; configs/accelerate/ holds accelerate launch configs (tests/test_launch.py).
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "accelerate")
REAL_DIRS = ("internlm2_chat_1_8b", "internlm2_chat_7b")
REAL = [c for c in CONFIGS if c.parent.name in REAL_DIRS and c.stem != "sft"]
REAL_SFT = [c for c in CONFIGS if c.parent.name in REAL_DIRS and c.stem == "sft"]

_COMMON = {"model_type": "internlm2", "vocab_size": 92544, "rope_theta": 1000000,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False,
           "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "hidden_act": "silu",
           "tie_word_embeddings": False}
PUBLISHED = {
    # config.json values of internlm2-chat-1_8b / -7b as published, keyed by the folder name a
    # recipe's model.llm ends in; expected parameter counts.
    "internlm2-chat-1_8b": ({**_COMMON, "num_hidden_layers": 24, "hidden_size": 2048,
                             "num_attention_heads": 16, "num_key_value_heads": 8,
                             "intermediate_size": 8192}, 1.89e9),
    "internlm2-chat-7b": ({**_COMMON, "num_hidden_layers": 32, "hidden_size": 4096,
                           "num_attention_heads": 32, "num_key_value_heads": 8,
                           "intermediate_size": 14336}, 7.74e9),
}


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def published_llm(config) -> tuple[dict, float]:
    """The published config and parameter count of the LLM the recipe's model.llm names."""
    name = Path(config.model.llm).name
    assert name in PUBLISHED, f"model.llm {config.model.llm} names no published InternLM2-chat"
    return PUBLISHED[name]


def projector_params(vision_width: int, hidden: int, depth: int) -> int:
    """LLaVA's mlp{depth}x_gelu: Linear(vision, hidden), then depth - 1 Linear(hidden, hidden)."""
    return vision_width * hidden + hidden + (depth - 1) * (hidden * hidden + hidden)


def test_configs_are_found():
    names = {rel(c) for c in CONFIGS}
    assert {"configs/demo/lm.yaml", "configs/demo/pretrain.yaml", "configs/demo/finetune.yaml",
            "configs/internlm2_chat_1_8b/pretrain.yaml",
            "configs/internlm2_chat_7b/finetune.yaml"} <= names
    assert len(REAL) == 8  # pretrain, finetune, finetune_anyres, dpo at 1.8B and 7B
    assert [rel(c) for c in REAL_SFT] == ["configs/internlm2_chat_1_8b/sft.yaml",
                                          "configs/internlm2_chat_7b/sft.yaml"]


@pytest.mark.parametrize("path", REAL_SFT, ids=rel)
def test_real_sft_config_is_text_only_qlora(path):
    config = load_config(path)
    assert (config.stage, config.model.quantization, config.train.llm) == ("sft", "4bit", "lora")
    assert not STAGES[config.stage].vision and config.data.pack
    assert Path(config.model.llm).name == path.parent.name.replace("internlm2_chat_",
                                                                    "internlm2-chat-")
    published, expected_params = published_llm(config)
    with torch.device("meta"):
        llm = LlamaForCausalLM(internlm2_to_llama_config(published))
    assert sum(p.numel() for p in llm.parameters()) == pytest.approx(expected_params, rel=0.01)


# The message of check_paths (data.train and data.eval: sources.source_problems) for each
# path setting, as its first word (up to "=").
PATH_KEYS = ("model.llm", "data.train", "data.eval", "data.image_folder",
             "model.vision.pretrained", "model.vision.config_file", "init_from")


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_config_loads_and_validates(path, tmp_path):
    config = load_config(path)
    assert config.stage in STAGES
    assert config.model.llm and config.data.train and config.run_dir
    stage = STAGES[config.stage]
    if stage.vision:
        assert config.data.image_folder, "a vision stage needs data.image_folder"
    mode = config.train.llm or stage.llm
    if mode == "full":
        assert config.model.quantization is None
    # Paths are checked when a run starts: every path the recipe sets is named when absent...
    def value(key: str):
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        return node

    used = [k for k in PATH_KEYS if value(k) and (stage.vision or not k.startswith(
        ("data.image_folder", "model.vision.")))]
    absent = load_config(path, [f"{k}={tmp_path / 'absent' / k}" for k in used])
    problems = check_paths(absent, stage.vision) + source_problems(absent.data, stage.vision)
    assert sorted(p.split()[0].split("=")[0] for p in problems) == sorted(used), problems
    # ... and none is once they exist.
    present = tmp_path / "present"
    for key in used:
        target = present / key
        if key in ("model.llm", "data.image_folder"):
            target.mkdir(parents=True)
        elif key == "init_from":
            target.mkdir(parents=True)
            (target / "config.yaml").write_text("stage: pretrain\n")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}")
    config = load_config(path, [f"{k}={present / k}" for k in used])
    assert check_paths(config, stage.vision) + source_problems(config.data, stage.vision) == []


@pytest.mark.parametrize("folder", sorted({c.parent for c in CONFIGS}), ids=rel)
def test_finetune_continues_its_pretrain(folder):
    """In each folder the finetune stage starts from the pretrain stage's run, with the same
    base LLM and vision tower."""
    if not (folder / "pretrain.yaml").is_file() or not (folder / "finetune.yaml").is_file():
        pytest.skip("no pretrain/finetune pair")
    pretrain, finetune = load_config(folder / "pretrain.yaml"), load_config(folder / "finetune.yaml")
    assert pretrain.stage == "pretrain" and finetune.stage == "finetune"
    assert finetune.init_from == pretrain.run_dir
    assert finetune.model.llm == pretrain.model.llm
    assert finetune.model.vision == pretrain.model.vision
    assert finetune.model.projector_depth == pretrain.model.projector_depth
    assert finetune.model.template == pretrain.model.template
    assert finetune.model.quantization == "4bit" and (finetune.train.llm or "lora") == "lora"


@pytest.fixture(scope="module")
def clip_l_336() -> VisionTower:
    return VisionTower(create_open_clip("ViT-L-14-336-quickgelu", device="meta"))


@pytest.mark.parametrize("path", REAL, ids=rel)
def test_real_config_model_sizes(path, clip_l_336):
    config = load_config(path)
    published, expected_params = published_llm(config)
    assert config.model.vision.name == "ViT-L-14-336-quickgelu"
    assert config.model.vision.feature_layer == -2
    assert config.model.projector_depth == 2
    assert config.model.template == "internlm2_chat"

    llama_config = internlm2_to_llama_config(published)
    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config)
    n_llm = sum(p.numel() for p in llm.parameters())
    assert n_llm == pytest.approx(expected_params, rel=0.01)

    vision = clip_l_336
    assert (vision.num_patches, vision.hidden_size, vision.image_size) == (576, 1024, 336)
    # The ViT's MLPs use QuickGELU, as OpenAI's weights need.
    assert type(vision.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert vision.mean == (0.48145466, 0.4578275, 0.40821073)
    with torch.device("meta"):
        features = vision(torch.empty(2, 3, 336, 336))
    assert features.shape == (2, 576, 1024)

    hidden = published["hidden_size"]
    with torch.device("meta"):
        projector = Projector(vision.hidden_size, hidden, config.model.projector_depth)
        projected = projector(features)
    assert projected.shape == (2, 576, hidden)
    assert sum(p.numel() for p in projector.parameters()) == projector_params(
        1024, hidden, config.model.projector_depth)
    # The image's 576 slots leave room for text in every sample.
    assert config.data.max_length >= 576 + 256


@pytest.mark.parametrize("path", [c for c in REAL if c.stem == "finetune_anyres"], ids=rel)
def test_real_anyres_config_leaves_room_for_its_largest_image(path):
    """Any image's tokens (overview + every tile of the largest grid, with row ends) leave
    room for text: data.max_length is counted with them."""
    from llava_tune.models.anyres import ImageLayout

    config = load_config(path)
    assert config.model.image_aspect == "anyres"
    grids = tuple(tuple(g) for g in config.model.anyres.grid_pinpoints)
    layout = ImageLayout(tile=336, patches=24, grids=grids)
    worst = max(layout.num_tokens((h, w)) for h in range(100, 2000, 37) for w in range(100, 2000, 41))
    assert worst == 576 + 48 * 49  # a square image on the 2 x 2 grid
    assert config.data.max_length >= worst + 256
