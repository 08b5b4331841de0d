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
from llava_tune.engine.build import read_run_config
from llava_tune.errors import UserError
from llava_tune.files import atomic_dir
from llava_tune.models.clip_convert import hf_clip_vision_state_dict
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower, create_open_clip

# The processor's template: our training text for an image turn is "<image>\n{question}".
# No BOS here, unlike InternLM2's own template: `processor(text=...)` adds it when tokenizing.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def export_hf_llava(run_dir: Path, out_dir: Path, llm, tokenizer) -> Path:
    """Write `out_dir` with the run's vision tower (as a CLIPVisionModel), projector
    (`multi_modal_projector`), the given merged full-precision `llm` and an `AutoProcessor`.

    `<image>` becomes a real token: the LLM's vocabulary grows by one row (its embedding is
    never read, image features replace it) and generation is told never to produce it.
    """
    config = read_run_config(run_dir)
    if config.stage == "sft":
        raise UserError(f"{run_dir} is a text-only run; export it with --format llm")
    if config.model.projector_depth != 2:
        raise UserError("transformers' Llava projector is Linear-GELU-Linear; this run's "
                        f"projector has depth {config.model.projector_depth}")
    v = config.model.vision
    tower = VisionTower(create_open_clip(v.name, v.pretrained, v.config_file), v.feature_layer)
    projector = Projector(tower.hidden_size, llm.config.hidden_size, 2)
    projector.load(run_dir / "projector")
    vision_config, vision_state = hf_clip_vision_state_dict(tower.visual)

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id >= llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(image_id + 1, mean_resizing=False)

    llava_config = LlavaConfig(
        vision_config=vision_config, text_config=llm.config, image_token_id=image_id,
        vision_feature_layer=v.feature_layer, vision_feature_select_strategy="default",
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
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAVA_CHAT_TEMPLATE,
        patch_size=tower.visual.patch_size[0], vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir
