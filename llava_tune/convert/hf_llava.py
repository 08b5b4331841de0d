"""Export a run as a transformers `LlavaForConditionalGeneration` + `AutoProcessor` folder, so
plain transformers (and the servers that read its layout) answer as `llava-tune chat` does."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from llava_tune.constants import IMAGE_TOKEN
from llava_tune.convert.open_clip import hf_clip_vision_state_dict
from llava_tune.data.template import internlm2_jinja
from llava_tune.errors import UserError
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower


def write_hf_llava(folder: Path, llm, tokenizer, tower: VisionTower, projector: Projector) -> None:
    """Write into `folder` the tower (as a CLIPVisionModel, any LoRA merged), the projector
    (`multi_modal_projector`), the merged full-precision `llm` and an `AutoProcessor`.

    `<image>` becomes a real token: the LLM's vocabulary grows by one row (its embedding is
    never read, image features replace it) and generation is told never to produce it.
    """
    if projector.config["depth"] != 2:
        raise UserError("transformers' Llava projector is Linear-GELU-Linear; this run's "
                        f"projector has depth {projector.config['depth']}: export it with "
                        "--format xtuner instead")
    vision_config, vision_state = hf_clip_vision_state_dict(tower.base)

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id >= llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)

    llava_config = LlavaConfig(
        vision_config=vision_config, text_config=llm.config, image_token_id=image_id,
        # transformers indexes hidden_states, embeddings first: block p is hidden_states[p + 1].
        vision_feature_layer=tower.feature_layer if tower.feature_layer < 0
        else tower.feature_layer + 1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=tower.num_patches, tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(llava_config).to(torch.float32)
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
        bos_token_id=tokenizer.bos_token_id, suppress_tokens=[image_id])

    size = tower.image_size
    image_processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(tower.mean), image_std=list(tower.std))
    # No BOS in the processor's template, unlike InternLM2's own: `processor(text=...)` adds it.
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=internlm2_jinja(bos=False, image_items=True),
        patch_size=tower.visual.patch_size[0], vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
