"""Export a run as a transformers `LlavaForConditionalGeneration` (pad),
`LlavaNextForConditionalGeneration` or `LlavaOnevisionForConditionalGeneration` (anyres) +
`AutoProcessor` folder, so plain transformers
(and the servers that read its layout) answer as `llava-tune chat` does; and read such a
folder back (`read_hf_llava`), so chat, eval and web take it too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    BitsAndBytesConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedModel,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from llava_tune.constants import IMAGE_TOKEN, VIDEO_TOKEN
from llava_tune.convert.open_clip import hf_clip_vision_state_dict
from llava_tune.data.template import internlm2_jinja
from llava_tune.errors import UserError
from llava_tune.files import read_json
from llava_tune.models.anyres import ImageLayout
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower

MODEL_TYPES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
"""The folders read back: model_type in config.json -> the transformers class."""

CHAT_TEMPLATE_WITH_BOS = "chat_template_with_bos.jinja"
"""The export's chat template with BOS first (`chat_template.jinja` has none, since
`processor(text=...)` adds it): for `vllm serve --chat-template`."""

KINDS = ("llava", "llava_next", "llava_onevision")
"""What write_hf_llava writes: transformers' Llava (pad), LlavaNext (anyres) or
LlavaOnevision (anyres, several images as squares, videos)."""


def check_kind(kind: str, layout: ImageLayout) -> None:
    """Refuse, naming the setting, a run whose image reading `kind`'s model does not do."""
    fmt = "hf-" + kind.replace("_", "-")
    if kind == "llava":
        if layout.anyres:
            raise UserError("this run reads images as anyres tiles (model.image_aspect=anyres), "
                            "which transformers' Llava cannot; export it with --format "
                            "hf-llava-next or hf-llava-onevision")
        return
    if not layout.anyres:
        raise UserError(f"this run reads images with model.image_aspect=pad, {fmt} tiles "
                        "them; export it with --format hf-llava")
    if kind == "llava_next":
        if layout.pool_max is not None:
            raise UserError("this run pools its tiles' features (model.anyres.pool_max, "
                            "OneVision's anyres_max_N), which LlavaNext does not; export it "
                            "with --format hf-llava-onevision")
        if layout.multi_image != "tiles":
            raise UserError("this run reads each of several images as one square "
                            "(model.anyres.multi_image=square), LlavaNext tiles them; export it "
                            "with --format hf-llava-onevision")
        return
    if layout.multi_image != "square":
        raise UserError("LlavaOnevision reads each of several images as one square; this run "
                        "tiles them (model.anyres.multi_image=tiles): export it with --format "
                        "hf-llava-next, or train with model.anyres.multi_image=square")
    if layout.video_pool != 2:
        raise UserError(f"LlavaOnevision pools video frames 2 x 2; this run pools by "
                        f"{layout.video_pool} (model.video_pool)")


def write_hf_llava(folder: Path, llm, tokenizer, tower: VisionTower, projector: Projector,
                   layout: ImageLayout, kind: str = "llava") -> None:
    """Write into `folder` the tower (as a CLIPVisionModel, any LoRA merged), the projector
    (`multi_modal_projector`), the merged full-precision `llm` and an `AutoProcessor`, as
    transformers' `kind` (KINDS): for anyres, its grid pinpoints in pixels and the
    `image_newline`; for OneVision, `anyres_max_N` and a video processor too.

    `<image>` (and OneVision's `<video>`) become real tokens: the LLM's vocabulary grows (their
    embeddings are never read, image features replace them) and generation is told never to
    produce them.
    """
    check_kind(kind, layout)
    if projector.config["depth"] != 2:
        raise UserError("transformers' Llava projector is Linear-GELU-Linear; this run's "
                        f"projector has depth {projector.config['depth']}: export it with "
                        "--format xtuner instead")
    vision_config, vision_state = hf_clip_vision_state_dict(tower.base)
    onevision = kind == "llava_onevision"
    markers = [IMAGE_TOKEN, VIDEO_TOKEN] if onevision else [IMAGE_TOKEN]
    tokenizer.add_tokens([m for m in markers if m not in tokenizer.get_vocab()],
                         special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(markers)
    if max(ids) >= llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(max(ids) + 1, mean_resizing=False)

    common = dict(
        vision_config=vision_config, text_config=llm.config,
        # transformers indexes hidden_states, embeddings first: block p is hidden_states[p + 1].
        vision_feature_layer=tower.feature_layer if tower.feature_layer < 0
        else tower.feature_layer + 1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    pinpoints = [list(resolution) for resolution in layout.resolutions]
    # anyres_max_N with N the largest grid's tiles never pools: a run without pool_max.
    anyres_max = f"anyres_max_{layout.pool_max or max(r * c for r, c in layout.grids or [(1, 1)])}"
    if kind == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(
            **common, image_token_id=ids[0], image_seq_length=tower.num_patches))
    elif kind == "llava_next":
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            **common, image_token_id=ids[0], image_seq_length=tower.num_patches,
            image_grid_pinpoints=pinpoints))
    else:
        model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            **common, image_token_index=ids[0], video_token_index=ids[1],
            image_grid_pinpoints=pinpoints, vision_aspect_ratio=anyres_max))
    model = model.to(torch.float32)
    if kind != "llava":
        with torch.no_grad():
            model.model.image_newline.copy_(projector.image_newline)
    model.model.vision_tower.load_state_dict(vision_state)
    model.model.multi_modal_projector.load_state_dict({
        "linear_1.weight": projector.model[0].weight, "linear_1.bias": projector.model[0].bias,
        "linear_2.weight": projector.model[2].weight, "linear_2.bias": projector.model[2].bias,
    })
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config = GenerationConfig(
        eos_token_id=[i for i in stop if i is not None], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, suppress_tokens=ids)
    model.save_pretrained(folder, state_dict=_nested_tower_keys(model.state_dict()))
    _processor(kind, tokenizer, tower, pinpoints, anyres_max).save_pretrained(folder)
    # For servers that tokenize the rendered chat without special tokens (`vllm serve`'s chat
    # completions: add_special_tokens=False), so the prompt starts with BOS as ours does.
    (folder / CHAT_TEMPLATE_WITH_BOS).write_text(
        internlm2_jinja(bos=True, image_items=True), encoding="utf-8")


def _nested_tower_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with the CLIP tower's keys under `vision_model.`, as every published
    llava-hf checkpoint has them (on disk: `vision_tower.vision_model.*`).

    transformers >= 5.6 flattened `CLIPVisionModel` and saves `vision_tower.embeddings.*`, which
    vLLM refuses: its own CLIPVisionModel still nests `vision_model` and its Llava loader maps no
    such prefix (vllm 0.33.0, model_executor/models/llava.py and clip.py). transformers reads
    both spellings back."""
    tower = "model.vision_tower."
    if any(key.startswith(tower + "vision_model.") for key in state):
        return state  # a transformers that still nests it
    return {(tower + "vision_model." + key.removeprefix(tower) if key.startswith(tower) else key):
            value for key, value in state.items()}


def _processor(kind: str, tokenizer, tower: VisionTower, pinpoints: list, anyres_max: str):
    """The export's AutoProcessor: images (and videos) and text as the run reads them."""
    size = tower.image_size
    norm = dict(image_mean=list(tower.mean), image_std=list(tower.std))
    # No BOS in the processor's template, unlike InternLM2's own: `processor(text=...)` adds it.
    text = dict(tokenizer=tokenizer, chat_template=internlm2_jinja(bos=False, image_items=True),
                vision_feature_select_strategy="default", image_token=IMAGE_TOKEN)
    if kind == "llava_onevision":
        square = {"height": size, "width": size}
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessorPil(
                size=square, image_grid_pinpoints=pinpoints, **norm),
            video_processor=LlavaOnevisionVideoProcessor(size=square, **norm),
            # The processor subtracts the CLS token ("default") that its count includes.
            num_image_tokens=tower.num_patches + 1, video_token=VIDEO_TOKEN,
            vision_aspect_ratio=anyres_max, **text)
    sizes = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm)
    common = dict(patch_size=tower.base.patch_size, num_additional_image_tokens=1, **text)
    if kind == "llava_next":
        return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(
            image_grid_pinpoints=pinpoints, **sizes), **common)
    return LlavaProcessor(image_processor=LlavaImageProcessorPil(do_pad=True, **sizes), **common)


# --------------------------------------------------------------------------- reading back


def is_hf_llava_dir(path: str | Path) -> bool:
    """A folder whose config.json is a transformers Llava or LlavaNext model (our hf-llava
    and hf-llava-next exports)."""
    config = Path(path) / "config.json"
    return config.is_file() and read_json(config).get("model_type") in MODEL_TYPES


class HfVisionTower(nn.Module):
    """transformers' CLIP tower of a Llava model in the role of our VisionTower: pixels
    [B, 3, S, S] -> the patch features of one hidden layer [B, N, Dv], as Llava selects them
    (the CLS token dropped under the "default" strategy)."""

    def __init__(self, tower: nn.Module, config: LlavaConfig) -> None:
        super().__init__()
        if not isinstance(config.vision_feature_layer, int):
            raise UserError("this Llava model concatenates several vision layers "
                            f"({config.vision_feature_layer}); llava-tune reads one layer")
        self.tower = tower
        self.feature_layer = config.vision_feature_layer
        self.keep_cls = config.vision_feature_select_strategy == "full"
        vision = config.vision_config
        self.image_size = vision.image_size
        self.hidden_size = vision.hidden_size
        self.num_patches = (vision.image_size // vision.patch_size) ** 2 + int(self.keep_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        hidden = self.tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        features = hidden[self.feature_layer]
        return features if self.keep_cls else features[:, 1:]


class HfImageProcessor:
    """The folder's own image processor as ours: PIL image -> pixels [3, S, S]."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """-> [P, 3, S, S], as ours: one square (Llava), or the overview and tiles (LlavaNext,
        which returns them as [1, P, 3, S, S])."""
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return pixels[0] if pixels.dim() == 5 else pixels


@dataclass
class HfLlava:
    """The parts of a Llava folder, shaped as a run's: the causal LM, the tower, the projector
    (`multi_modal_projector`: features [I, N, Dv] -> [I, N, D]), tokenizer, image processor."""

    llm: PreTrainedModel
    vision: HfVisionTower
    projector: nn.Module
    tokenizer: object
    image_processor: HfImageProcessor
    layout: ImageLayout
    """How the folder's model turns images into tokens (pad, or LlavaNext's anyres)."""


def read_hf_llava(folder: str | Path, dtype: torch.dtype, device: torch.device,
                  quantization: BitsAndBytesConfig | None = None) -> HfLlava:
    """Load a Llava folder through `LlavaForConditionalGeneration` and `AutoProcessor`.

    A quantized load quantizes the language model only (the tower, projector and LM head
    stay in `dtype`), as a run's QLoRA does.
    """
    if quantization is not None:
        # Module paths from the model's root (transformers matches them as prefixes).
        quantization.llm_int8_skip_modules = ["model.vision_tower", "model.multi_modal_projector",
                                              "lm_head"]
    model_type = read_json(Path(folder) / "config.json").get("model_type")
    llava = MODEL_TYPES[model_type].from_pretrained(
        folder, dtype=dtype, quantization_config=quantization, device_map={"": device})
    processor = AutoProcessor.from_pretrained(folder)
    vision = llava.config.vision_config
    patches = vision.image_size // vision.patch_size
    grids: tuple = ()
    projector = llava.model.multi_modal_projector
    if model_type == "llava_next":
        grids = tuple((h // vision.image_size, w // vision.image_size)
                      for h, w in llava.config.image_grid_pinpoints)
        projector.image_newline = llava.model.image_newline  # where our model looks for it
    # The text model alone, as a causal LM over the same modules (nothing is copied), so one
    # generation path serves runs and this folder: embeddings with image features in, tokens out.
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llava.config.text_config)
    llm.model = llava.model.language_model
    llm.lm_head = llava.lm_head
    llm.generation_config = llava.generation_config  # its eos ids, and <image> suppressed
    return HfLlava(llm, HfVisionTower(llava.model.vision_tower, llava.config), projector,
                   processor.tokenizer, HfImageProcessor(processor.image_processor),
                   ImageLayout(vision.image_size, patches, grids))
