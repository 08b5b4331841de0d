"""Chat templates: conversations to token ids with a loss mask on the answers only.

The whole conversation is rendered to one string and tokenized in segments cut at the
answers' boundaries (`segments.encode_segments`), so no token straddles a prompt and its answer:
training sees the prompt exactly as inference does (`prompt_ids`) and the answer as tokens
generation can produce after it, and the loss covers every token of each answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from llava_tune.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, VIDEO_TOKEN
from llava_tune.data.segments import encode_segments
from llava_tune.errors import UserError

Message = dict[str, str]
"""{"role": "system" | "user" | "assistant", "content": str}"""


@dataclass(frozen=True)
class ChatTemplate:
    """How one model family lays out a conversation.

    The loss covers `answer` (the reply and its end-of-turn token); `after_answer` (the
    newline that follows) is context only, as XTuner trains InternLM2.
    """

    name: str
    system: str
    user: str
    answer: str
    after_answer: str
    stop_words: tuple[str, ...]
    default_system: str | None = None
    jinja: str = ""
    """The same layout as a Hugging Face chat template (tokenizer.chat_template), BOS included."""

    def render(
        self, messages: list[Message], bos_token: str, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the [start, end) character spans that carry loss.

        With `add_generation_prompt` the text ends where the next answer begins (inference).
        """
        check_roles(messages)
        parts = [bos_token]
        targets: list[tuple[int, int]] = []
        length = len(bos_token)
        system = self.default_system
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                system = content
                continue
            if role == "user":
                piece = self.user.format(content=content)
                if system:
                    piece = self.system.format(content=system) + piece
                    system = None
            else:
                answer = self.answer.format(content=content)
                targets.append((length, length + len(answer)))
                piece = answer + self.after_answer
            parts.append(piece)
            length += len(piece)
        if not add_generation_prompt and messages and messages[-1]["role"] == "user":
            # A trailing question without an answer teaches nothing; drop it.
            text = "".join(parts[:-1])
            return text, targets
        return "".join(parts), targets

    def encode(
        self, messages: list[Message], tokenizer: PreTrainedTokenizerBase
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels ([T] each); labels are IGNORE_INDEX outside the answers.

        Each `<image>` stays one token here (the tokenizer must know it, see
        `add_image_token`); the dataset expands it to the image's N feature slots.
        """
        text, targets = self.render(messages, tokenizer.bos_token)
        ids: list[int] = []
        labels: list[int] = []
        for segment_ids, is_answer in _encode_spans(tokenizer, text, targets):
            ids += segment_ids
            labels += segment_ids if is_answer else [IGNORE_INDEX] * len(segment_ids)
        return ids, labels

    def prompt_ids(self, messages: list[Message], tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Token ids of the conversation so far plus the start of the assistant's answer.

        Tokenized like `encode` (cut at the earlier answers), so the training ids of a
        conversation start with the prompt ids of each of its questions."""
        text, targets = self.render(messages, tokenizer.bos_token, add_generation_prompt=True)
        return [t for segment_ids, _ in _encode_spans(tokenizer, text, targets) for t in segment_ids]


def _encode_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, targets: list[tuple[int, int]]
) -> list[tuple[list[int], bool]]:
    """`text` cut at the [start, end) `targets`: (ids, is_target) per piece, in order."""
    cuts = [0, *(c for span in targets for c in span), len(text)]
    pieces = [(text[a:b], i % 2 == 1) for i, (a, b) in enumerate(pairwise(cuts))]
    encoded = encode_segments(tokenizer, [piece for piece, _ in pieces])
    return [(ids, is_target) for ids, (_, is_target) in zip(encoded, pieces, strict=True)]


def internlm2_jinja(bos: bool = True, image_items: bool = False) -> str:
    """InternLM2-chat's layout as a Jinja chat template: BOS (when `bos`), then per message
    `<|im_start|>{role}\n{content}<|im_end|>\n`, and `<|im_start|>assistant\n` for
    add_generation_prompt.

    `image_items`: content may also be a list of {"type": "image" | "video" | "text"} items,
    an image written as `<image>\n`, a video as `<video>\n` (transformers' processors expect
    that form).
    """
    content = "{{ message['content'] }}"
    if image_items:
        content = (
            "{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for item in message['content'] %}"
            "{% if item['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\n' }}"
            "{% elif item['type'] == 'video' %}{{ '" + VIDEO_TOKEN + "\n' }}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
            "{% endfor %}{% endif %}"
        )
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        + "{{ '<|im_start|>' + message['role'] + '\n' }}" + content + "{{ '<|im_end|>\n' }}"
        + "{% endfor %}"
        + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


INTERNLM2_CHAT = ChatTemplate(
    name="internlm2_chat",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    answer="{content}<|im_end|>",
    after_answer="\n",
    stop_words=("<|im_end|>",),
    jinja=internlm2_jinja(),
)

TEMPLATES = {t.name: t for t in (INTERNLM2_CHAT,)}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_roles(messages: list[Message]) -> None:
    """Raise ValueError unless roles run: optional system, then user/assistant alternating."""
    expected = "user"
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "system" and i == 0:
            continue
        if role != expected:
            raise ValueError(f"message {i} has role {role!r} where {expected!r} was expected")
        expected = "assistant" if role == "user" else "user"


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register `<image>` as a special token (tokenized alone, never split) and return its id.

    The id never reaches the LLM's embedding table: datasets and generation replace it with
    image feature slots.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                             special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def expand_image_slots(
    ids: list[int], labels: list[int] | None, image_id: int | None,
    num_image_tokens: int | Sequence[int],
) -> tuple[list[int], list[int] | None]:
    """Replace each `<image>` id by IMAGE_TOKEN_INDEX slots (no loss): `num_image_tokens` for
    every image, or the i-th count for the i-th image."""
    out_ids: list[int] = []
    out_labels: list[int] | None = None if labels is None else []
    counts = iter(num_image_tokens) if not isinstance(num_image_tokens, int) else None
    for i, token in enumerate(ids):
        if token == image_id:
            n = num_image_tokens if counts is None else next(counts)
            out_ids += [IMAGE_TOKEN_INDEX] * n
            if out_labels is not None:
                out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(token)
            if out_labels is not None:
                out_labels.append(labels[i])
    return out_ids, out_labels
