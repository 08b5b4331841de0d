"""The exports hold what the servers users run them with read: `vllm serve` the hf-llava
export, `lmdeploy serve api_server` the internlm2 export. Neither server runs here (no GPU),
so each test checks the files, config fields, weight names and chat-template rendering that
the server's loader reads, as its source reads them.

Sources (read from the released wheels, PyPI):
- vLLM 0.33.0 (vllm-0.33.0-cp38-abi3 wheel, Nov 2026; it requires transformers>=5.16.1,<5.21):
  vllm/model_executor/models/llava.py (LlavaForConditionalGeneration, its hf_to_vllm_mapper,
  LlavaProcessingInfo, _get_num_hidden_layers), vllm/model_executor/models/clip.py
  (CLIPVisionModel nests `vision_model`; CLIPVisionTransformer.load_weights),
  vllm/model_executor/models/utils.py (AutoWeightsLoader: an unknown name is an error),
  vllm/renderers/hf.py (resolve_chat_template: --chat-template, then the processor's, then
  the tokenizer's; _detect_content_format), vllm/entrypoints/openai/chat_completion/
  protocol.py (add_special_tokens defaults to False for chat), vllm/sampling_params.py
  (update_from_generation_config: generation_config.json's eos ids stop generation).
  The same mapper is in the GitHub source (vllm-project/vllm 35d3c24b, llava.py).
- lmdeploy 0.18.0 (lmdeploy-0.18.0-cp311 wheel, Sep 2026): lmdeploy/archs.py
  (get_model_arch: config.json `architectures`), lmdeploy/hf_configs/__init__.py
  (config_from_pretrained falls back to PretrainedConfig without remote code),
  lmdeploy/turbomind/supported_models.py (InternLM2ForCausalLM -> 'internlm2'),
  lmdeploy/turbomind/models/internlm2.py + models/utils.py + text_model.py (weight names and
  config fields), lmdeploy/pytorch/models/internlm2.py + module_map.py (the pytorch engine),
  lmdeploy/tokenizer.py (AutoTokenizer; Tokenizer.encode drops a doubled BOS),
  lmdeploy/model.py (HFChatTemplate: the tokenizer's chat_template; stop words = eos_token),
  lmdeploy/serve/processors/multimodal.py (encode(prompt, add_bos=True)),
  lmdeploy/utils.py get_hf_gen_cfg + messages.py update_from_hf_gen_cfg
  (generation_config.json's eos ids stop generation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import pytest
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, AutoTokenizer, LlavaConfig, PretrainedConfig

from llava_tune.assembly.model import load_run
from llava_tune.cli import main
from llava_tune.convert.hf_llava import CHAT_TEMPLATE_WITH_BOS
from llava_tune.convert.internlm2 import GENERATION_CONFIG_NAME
from llava_tune.data.template import INTERNLM2_CHAT

QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def exports(tiny_finetune_run, tmp_path_factory, cache_env) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("serving")
    for fmt in ("hf-llava", "internlm2"):
        assert main(["export", str(tiny_finetune_run), str(out / fmt), "--format", fmt]) == 0
    return {fmt: out / fmt for fmt in ("hf-llava", "internlm2")}


@pytest.fixture(scope="module")
def run(tiny_finetune_run, cache_env):
    """The run as llava-tune chats with it: its tokenizer and chat template
    (llava_tune/data/template.py) are the reference."""
    bundle = load_run(tiny_finetune_run, quantization=None)
    assert bundle.template is INTERNLM2_CHAT
    return bundle


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Every tensor name -> shape in the folder's safetensors (one file or an index's shards),
    as the servers find them: model.safetensors.index.json first, else model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(read_json(index)["weight_map"].values())) if index.is_file()
             else [p.name for p in sorted(folder.glob("model*.safetensors"))])
    assert files, f"no safetensors weights in {folder}"
    shapes = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            shapes.update({key: list(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def our_prompt_ids(run, messages) -> list[int]:
    """The ids llava-tune's own template feeds the model (BOS first, `<image>` one token)."""
    return run.template.prompt_ids(messages, run.tokenizer)


# --------------------------------------------------------------------------- vLLM, hf-llava

# vllm llava.py LlavaForConditionalGeneration.hf_to_vllm_mapper (orig_to_new_prefix): the
# transformers >= 4.52 names on the left, vLLM's own module names on the right; a name that
# matches none is taken as it is (the older layout, which transformers 5 still writes).
VLLM_LLAVA_PREFIXES = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "lm_head.": "language_model.lm_head.",
}
# vLLM's module tree for a CLIP-tower Llava over a Llama text model (llava.py: vision_tower is
# clip.py's CLIPVisionModel, whose only child is `vision_model`; multi_modal_projector has
# linear_1/linear_2; language_model is the registered LlamaForCausalLM with `model` and
# `lm_head`). AutoWeightsLoader raises on any name outside it ("There is no module or
# parameter named ..."); vLLM packs q/k/v and gate/up itself, from these names.
VLLM_LLAVA_NAME = re.compile(
    r"language_model\.lm_head\.weight"
    r"|language_model\.model\.(embed_tokens\.weight|norm\.weight"
    r"|layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight"
    r"|layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias))"
    r"|multi_modal_projector\.linear_[12]\.(weight|bias)"
    r"|vision_tower\.vision_model\.(embeddings\.(class_embedding|patch_embedding\.weight"
    r"|position_embedding\.weight)|pre_layrnorm\.(weight|bias)|post_layernorm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|layer_norm[12])"
    r"\.(weight|bias))")


def vllm_name(key: str) -> str:
    for old, new in VLLM_LLAVA_PREFIXES.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def vllm_content_format(template: str) -> str:
    """vllm renderers/hf.py _detect_content_format, for our templates: "openai" when the
    template loops over a message's content (then vLLM passes content as a list of
    {"type": "image"} / {"type": "text", "text": ...} items and inserts no `<image>` itself)."""
    ast = jinja2.Environment().parse(template)
    message_vars = {loop.target.name for loop in ast.find_all(jinja2.nodes.For)
                    if isinstance(loop.iter, jinja2.nodes.Name) and loop.iter.name == "messages"}
    for loop in ast.find_all(jinja2.nodes.For):
        it = loop.iter
        if (isinstance(it, jinja2.nodes.Getitem) and isinstance(it.node, jinja2.nodes.Name)
                and it.node.name in message_vars and isinstance(it.arg, jinja2.nodes.Const)
                and it.arg.value == "content"):
            return "openai"
    return "string"


def test_hf_llava_export_has_what_vllm_reads(exports, run):
    out = exports["hf-llava"]
    # Files: config.json + safetensors (model loader), generation_config.json (--generation-config
    # auto, the default), processor_config.json with the image processor nested in it (what
    # transformers 5 writes and reads: vLLM 0.33 runs on transformers >= 5.16), tokenizer.json +
    # tokenizer_config.json (AutoTokenizer), chat_template.jinja (the processor's template, vLLM's
    # 2nd choice) and the BOS-first template for `--chat-template` (1st choice).
    for name in ("config.json", "generation_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 CHAT_TEMPLATE_WITH_BOS):
        assert (out / name).is_file(), name

    config = read_json(out / "config.json")
    # The model registry picks the class by architectures[0]; the text model by
    # text_config.architectures (init_vllm_registered_model); the tower by the vision config's
    # class (init_vision_tower_for_llava: CLIPVisionConfig -> CLIPVisionModel).
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["model_type"] == "llava"
    text, vision = config["text_config"], config["vision_config"]
    assert text["model_type"] == "llama" and text["architectures"] == ["LlamaForCausalLM"]
    assert vision["model_type"] == "clip_vision_model"
    # vLLM reads hf_config.image_token_index (LlavaLikeConfig); transformers' LlavaConfig maps
    # image_token_id onto it, and config.json spells it image_token_index.
    image_id = run.tokenizer.convert_tokens_to_ids("<image>")
    hf_config = LlavaConfig.from_pretrained(out)
    assert config["image_token_index"] == hf_config.image_token_index == image_id
    assert hf_config.image_token_id == image_id < text["vocab_size"]
    # LlavaMultiModalProjector(projector_hidden_act, multimodal_projector_bias); the tower runs
    # up to vision_feature_layer (_get_num_hidden_layers) and drops CLS under "default".
    assert config["projector_hidden_act"] == "gelu"
    assert config["multimodal_projector_bias"] is True
    assert config["vision_feature_select_strategy"] == "default"
    layer = config["vision_feature_layer"]
    assert isinstance(layer, int) and -vision["num_hidden_layers"] <= layer < 0
    assert config["tie_word_embeddings"] is False

    # Weights: every name, after vLLM's mapper, is one of vLLM's own, and none is missing.
    shapes = weight_shapes(out)
    names = {vllm_name(key): shape for key, shape in shapes.items()}
    assert [k for k in names if not VLLM_LLAVA_NAME.fullmatch(k)] == []
    tower_layers = {int(k.split(".")[4]) for k in names if ".encoder.layers." in k}
    needed = vision["num_hidden_layers"] + layer + 1  # llava.py _get_layer_index
    assert set(range(needed)) <= tower_layers
    text_layers = {int(k.split(".")[3]) for k in names
                   if k.startswith("language_model.model.layers.")}
    assert text_layers == set(range(text["num_hidden_layers"]))
    for key in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
                "vision_tower.vision_model.embeddings.patch_embedding.weight",
                "multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_2.bias"):
        assert key in names, key
    assert names["multi_modal_projector.linear_1.weight"] == [text["hidden_size"],
                                                              vision["hidden_size"]]
    # vLLM's CLIP patch embedding is a Conv2d without bias (clip.py CLIPVisionEmbeddings).
    assert "vision_tower.vision_model.embeddings.patch_embedding.bias" not in names

    # generation_config.json: its eos ids become stop tokens, <|im_end|> among them.
    generation = read_json(out / "generation_config.json")
    assert run.tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]

    # processor_config.json: LlavaProcessor expands each <image> to
    # (image_size // patch_size)**2 + num_additional_image_tokens, less 1 for "default";
    # vLLM counts the same from the config (CLIPEncoderInfo.get_num_image_tokens,
    # get_num_selected_vision_tokens) and refuses a mismatch.
    processor_config = read_json(out / "processor_config.json")
    assert processor_config["processor_class"] == "LlavaProcessor"
    assert processor_config["patch_size"] == vision["patch_size"]
    assert processor_config["num_additional_image_tokens"] == 1
    assert processor_config["vision_feature_select_strategy"] == "default"
    assert processor_config["image_token"] == "<image>"
    image_config = processor_config["image_processor"]
    assert image_config["crop_size"] == {"height": vision["image_size"],
                                         "width": vision["image_size"]}
    processor = AutoProcessor.from_pretrained(out)
    image = Image.new("RGB", (48, 20), (200, 30, 30))
    ids = processor(images=image, text="<image>", return_tensors="pt")["input_ids"][0].tolist()
    vllm_count = (vision["image_size"] // vision["patch_size"]) ** 2 + 1 - 1
    assert ids.count(image_id) == vllm_count == run.model.vision.num_patches
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == image_id


def test_hf_llava_chat_templates_render_our_prompt(exports, run, shapes_data):
    out = exports["hf-llava"]
    processor = AutoProcessor.from_pretrained(out)
    ours = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    # An OpenAI chat message with an image, as vLLM hands it to an "openai"-format template.
    openai = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text, _ = run.template.render(ours, bos_token="", add_generation_prompt=True)
    expected = our_prompt_ids(run, ours)
    assert expected[0] == run.tokenizer.bos_token_id
    image = Image.open(shapes_data / "images" / "heldout" / "000000.png")
    n = run.model.vision.num_patches
    image_id = run.tokenizer.convert_tokens_to_ids("<image>")
    expanded = [t for i in expected for t in ([image_id] * n if i == image_id else [i])]

    # chat_template.jinja, the processor's template (vLLM's choice without --chat-template; also
    # `LLM.chat`, whose multimodal tokenization adds special tokens): no BOS in the text, the
    # tokenizer adds it.
    default = (out / "chat_template.jinja").read_text(encoding="utf-8")
    assert vllm_content_format(default) == "openai"
    rendered = processor.apply_chat_template(openai, add_generation_prompt=True)
    assert rendered == text
    assert processor(images=image, text=rendered)["input_ids"][0] == expanded

    # `vllm serve` tokenizes the chat's text with add_special_tokens=False (the request's
    # default), so without --chat-template its prompt would lack BOS:
    no_bos = processor(images=image, text=rendered, add_special_tokens=False)
    assert no_bos["input_ids"][0] == expanded[1:]
    # ... and with `--chat-template OUT/chat_template_with_bos.jinja` it is ours exactly.
    with_bos = (out / CHAT_TEMPLATE_WITH_BOS).read_text(encoding="utf-8")
    assert vllm_content_format(with_bos) == "openai"
    rendered = processor.apply_chat_template(openai, chat_template=with_bos,
                                             add_generation_prompt=True)
    assert rendered == run.tokenizer.bos_token + text
    served = processor(images=image, text=rendered, add_special_tokens=False)
    assert served["input_ids"][0] == expanded
    assert processor.tokenizer(rendered, add_special_tokens=False)["input_ids"] == expected


# --------------------------------------------------------------------------- lmdeploy, internlm2


def internlm2_names(layers: int, bias: bool, tied: bool) -> set[str]:
    """The tensors lmdeploy reads for InternLM2: turbomind/models/internlm2.py
    (model.tok_embeddings, model.norm, output unless tied, per layer attention.wqkv (split by
    KV group), attention.wo, feed_forward.w1/w3/w2, attention_norm, ffn_norm) and the pytorch
    engine's InternLM2ForCausalLM (pytorch/models/internlm2.py, the same module names)."""
    names = {"model.tok_embeddings.weight", "model.norm.weight"} | (
        set() if tied else {"output.weight"})
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {p + "attention.wqkv.weight", p + "attention.wo.weight",
                  p + "feed_forward.w1.weight", p + "feed_forward.w2.weight",
                  p + "feed_forward.w3.weight", p + "attention_norm.weight",
                  p + "ffn_norm.weight"}
        if bias:
            names |= {p + "attention.wqkv.bias", p + "attention.wo.bias"}
    return names


def test_internlm2_export_has_what_lmdeploy_reads(exports, run):
    out = exports["internlm2"]
    # Files: config.json (get_model_arch), model.safetensors (turbomind/checkpoint.py: the
    # index, else model*.safetensors), tokenizer.model + tokenizer_config.json (AutoTokenizer,
    # and the chat template in it), generation_config.json (get_hf_gen_cfg: its eos ids stop).
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 GENERATION_CONFIG_NAME):
        assert (out / name).is_file(), name

    config = read_json(out / "config.json")
    # architectures[0] picks the engine: turbomind SUPPORTED_ARCHS and the pytorch module_map
    # both have InternLM2ForCausalLM; model_type internlm2 is what the remote code registers.
    assert config["architectures"] == ["InternLM2ForCausalLM"]
    assert config["model_type"] == "internlm2"
    # The fields the engines read (turbomind models/utils.py make_attention_config,
    # make_ffn_config, parse_rope_param, text_model.py rms_norm_eps, converter.py torch_dtype
    # and vocab_size; pytorch/models/internlm2.py also `bias` and pad_token_id).
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                "rope_theta", "tie_word_embeddings", "bias", "torch_dtype", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert config.get(key) is not None, key
    assert config["rope_scaling"] is None or config["rope_scaling"]["type"] in ("linear", "dynamic")
    # Without remote code (or without --trust-remote-code) lmdeploy falls back to
    # PretrainedConfig (hf_configs config_from_pretrained): every field above is still there.
    fallback = PretrainedConfig.from_pretrained(out)
    assert fallback.architectures == ["InternLM2ForCausalLM"]
    assert fallback.rms_norm_eps == config["rms_norm_eps"] and fallback.bias == config["bias"]

    shapes = weight_shapes(out)
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    assert set(shapes) == internlm2_names(layers, config["bias"], config["tie_word_embeddings"])
    head_dim = config["hidden_size"] // heads
    assert shapes["model.layers.0.attention.wqkv.weight"] == [
        (heads + 2 * config["num_key_value_heads"]) * head_dim, config["hidden_size"]]
    assert shapes["model.tok_embeddings.weight"] == [config["vocab_size"], config["hidden_size"]]

    # The stop tokens: lmdeploy stops on generation_config.json's eos ids and the tokenizer's
    # eos; the tokenizer's chat template adds only eos_token ("</s>") as a stop word, so
    # <|im_end|>, where our template ends a turn, must be in generation_config.json.
    generation = read_json(out / GENERATION_CONFIG_NAME)
    im_end = run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(generation["eos_token_id"]) == {config["eos_token_id"], im_end}


def test_internlm2_chat_template_renders_our_prompt(exports, run):
    out = exports["internlm2"]
    # lmdeploy's HuggingFaceTokenizer: AutoTokenizer (trust_remote_code off by default).
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template, "tokenizer_config.json has no chat_template for HFChatTemplate"
    assert tokenizer.eos_token_id == run.tokenizer.eos_token_id
    conversations = [
        [{"role": "user", "content": QUESTION}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}],
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "It is red."},
         {"role": "user", "content": "What shape is this?"}],
    ]
    for messages in conversations:
        # HFChatTemplate.messages2prompt: apply_chat_template(tokenize=False,
        # add_generation_prompt=True); then Tokenizer.encode(prompt, add_bos=True) adds special
        # tokens and drops one BOS of a doubled pair (the template writes BOS too).
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text, _ = run.template.render(messages, run.tokenizer.bos_token,
                                      add_generation_prompt=True)
        assert prompt == text
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if ids[:2] == [tokenizer.bos_token_id] * 2:
            ids = ids[1:]
        assert ids == our_prompt_ids(run, messages)
