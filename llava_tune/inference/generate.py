"""Prompt building and generation, shared by `chat` and `eval`: one question, one answer."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from llava_tune.assembly.model import ModelBundle
from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.template import Message, add_image_token, expand_image_slots
from llava_tune.errors import UserError
from llava_tune.models.anyres import Media

LOOP_MIN_REPEATS = 4
LOOP_MIN_TOKENS = 16
LOOP_MAX_PERIOD = 32


class LoopStop(StoppingCriteria):
    """Ends an answer caught in a loop: its last tokens are one block of at most
    LOOP_MAX_PERIOD tokens repeated LOOP_MIN_REPEATS times or more, LOOP_MIN_TOKENS tokens in
    all (so a number's repeated digits are no loop). A model asked what it was never trained
    on (a small LLaVA without its image) otherwise repeats itself up to max_new_tokens.

    For one conversation at a time (chat): `stopped` says whether it ended the answer.
    """

    def __init__(self) -> None:
        self.stopped = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for period in range(1, LOOP_MAX_PERIOD + 1):
            repeats = max(LOOP_MIN_REPEATS, -(-LOOP_MIN_TOKENS // period))
            if period * repeats > input_ids.shape[1]:
                continue
            blocks = input_ids[:, -period * repeats:].reshape(-1, repeats, period)
            done |= (blocks == blocks[:, -1:]).flatten(1).all(dim=1)
        self.stopped = self.stopped or bool(done.any())
        return done


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


def stop_token_ids(bundle: ModelBundle) -> list[int]:
    """EOS and the template's end-of-turn tokens (`<|im_end|>` for InternLM2)."""
    tokenizer = bundle.tokenizer
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    ids.update(vocab[word] for word in bundle.template.stop_words if word in vocab)
    return sorted(i for i in ids if i is not None)


Conversation = tuple[list[Message], list[Image.Image]]
"""Messages (the last one a user turn) and the images for their `<image>` markers, in order."""


@dataclass
class Prompt:
    ids: list[int]
    """Prompt ids with every image's slots expanded."""
    pixels: torch.Tensor | None = None
    """[P, 3, S, S]: the items' tower inputs (tiles or frames in turn), or None."""
    media: list[Media] = field(default_factory=list)
    """What each item is (models/anyres.py)."""


Visual = Image.Image | list[Image.Image]
"""An image, or a video as its frames (data/video.py's load_video)."""


def build_prompt(bundle: ModelBundle, messages: list[Message], images: list[Visual]) -> Prompt:
    """The prompt of `messages` (the last one a user turn) with `images` in their markers'
    slots: ids, tower inputs and what each item is. A video of another frame count than the
    model reads raises UserError."""
    ids = bundle.template.prompt_ids(messages, bundle.tokenizer)
    if not images:
        return Prompt(ids)
    image_id = add_image_token(bundle.tokenizer)
    layout = bundle.model.layout
    if layout is None:  # an export read back without a layout: pad squares
        ids, _ = expand_image_slots(ids, None, image_id, bundle.model.vision.num_patches)
        return Prompt(ids, torch.cat([bundle.image_processor(image) for image in images]))
    kind = layout.kind_of_images(sum(not isinstance(item, list) for item in images))
    media = [Media("video", frames=len(item)) if isinstance(item, list)
             else Media(kind, (item.height, item.width)) for item in images]
    for item in media:
        if item.kind == "video" and item.frames != layout.video_frames:
            raise UserError(f"a video of {item.frames} frames; this model reads "
                            f"{layout.video_frames} (data.video_frames)")
    # A pad image takes the tower's own count (an export's tower may keep its CLS token).
    counts = [layout.tokens(m) if m.kind == "video" or layout.anyres
              else bundle.model.vision.num_patches for m in media]
    ids, _ = expand_image_slots(ids, None, image_id, counts)
    processor = bundle.image_processor
    pixels = torch.cat([processor.frames(item) if m.kind == "video" else processor.square(item)
                        if m.kind == "square" else processor(item)
                        for item, m in zip(images, media, strict=True)])
    return Prompt(ids, pixels, media)


def _sampling(settings: GenerationSettings) -> dict:
    sampling = settings.temperature > 0
    return dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=settings.top_k if sampling else None,
        repetition_penalty=settings.repetition_penalty,
    )


@torch.no_grad()
def generate(
    bundle: ModelBundle,
    messages: list[Message],
    images: list[Image.Image] = (),
    settings: GenerationSettings | None = None,
    streamer=None,
    stopping_criteria: Sequence[StoppingCriteria] = (),
) -> str:
    """The assistant's next answer to `messages` (the last one a user turn).

    `images` fill the `<image>` markers in order. `streamer` (a transformers streamer)
    receives tokens as they are generated; `stopping_criteria` may end the answer early
    (e.g. a LoopStop).
    """
    return generate_batch(bundle, [(messages, list(images))], settings, streamer=streamer,
                          stopping_criteria=stopping_criteria)[0]


def eval_batch_size(requested: int | None) -> int:
    """Questions answered together: `requested`, or 16 on a GPU and 8 on a CPU (left-padded
    batches; larger ones stop paying off on 2 CPU cores)."""
    size = requested if requested is not None else 16 if torch.cuda.is_available() else 8
    if size < 1:
        raise UserError(f"--batch-size {size} must be at least 1")
    return size


@torch.no_grad()
def generate_batch(bundle: ModelBundle, conversations: list[Conversation],
                   settings: GenerationSettings | None = None, streamer=None,
                   stopping_criteria: Sequence[StoppingCriteria] = ()) -> list[str]:
    """The next answer of each conversation, generated together.

    Prompts are padded on the left (pad embeddings masked out, positions from the mask), so
    greedy answers equal those of one conversation at a time.
    """
    prompts = [build_prompt(bundle, messages, images) for messages, images in conversations]
    return generate_prompts(bundle, prompts, settings, streamer, stopping_criteria)


@torch.no_grad()
def generate_prompts(bundle: ModelBundle, prompts: list[Prompt],
                     settings: GenerationSettings | None = None, streamer=None,
                     stopping_criteria: Sequence[StoppingCriteria] = ()) -> list[str]:
    """`generate_batch` for prompts already built (`build_prompt`): the API builds each
    request's prompt when it arrives, to refuse one too long before it waits in the queue.

    `streamer.put` receives the prompt ids [B, 0] first, then each step's new tokens [B] (a
    finished row gets the pad id); `stopping_criteria` see the generated ids [B, t].
    """
    settings = settings or GenerationSettings()
    model = bundle.model
    device = model.llm.get_input_embeddings().weight.device
    length = max(len(p.ids) for p in prompts)
    pad = bundle.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(p.ids)) + p.ids for p in prompts],
                             device=device)
    mask = torch.tensor([[0] * (length - len(p.ids)) + [1] * len(p.ids) for p in prompts],
                        device=device)
    pixels = [p.pixels for p in prompts if p.pixels is not None]
    media = [m for p in prompts for m in p.media]
    embeds = model.input_embeddings(input_ids, torch.cat(pixels).to(device) if pixels else None,
                                    media=media or None)
    output = model.llm.generate(
        inputs_embeds=embeds, attention_mask=mask, eos_token_id=stop_token_ids(bundle),
        pad_token_id=pad, streamer=streamer,
        stopping_criteria=StoppingCriteriaList(stopping_criteria), **_sampling(settings))
    return [text.strip() for text in bundle.tokenizer.batch_decode(output, skip_special_tokens=True)]


def normalize_answer(text: str) -> str:
    """SHAPES.md's rule: lower-case, strip white space and one final period."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    return text.strip()


def strip_image_markers(text: str) -> str:
    return re.sub(rf"\s*{re.escape(IMAGE_TOKEN)}\s*", " ", text).strip()
