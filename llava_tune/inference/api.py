"""The OpenAI chat-completions request, read and checked for `llava-tune serve`.

A request becomes what `chat` would ask: the conversation's messages with one `<image>`
marker per image in front of its turn's text (as training records and `chat` place them),
the decoded images, and the sampling settings. Everything a client can get wrong is refused
here with an `ApiError` in OpenAI's error shape, before the request waits for the model:
422 for a body that does not match the schema, 400 for what the model cannot answer (the
message order, an image that does not decode, a prompt longer than the model's context),
413 for too many bytes or pixels, 404 for another model's name. No FastAPI here: the server
(inference/server.py) turns an ApiError into its response.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_tune.assembly.model import ModelBundle
from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.image import load_image
from llava_tune.data.template import Message
from llava_tune.errors import UserError
from llava_tune.inference.generate import GenerationSettings, Prompt, build_prompt
from llava_tune.inference.safety import check_upload

MAX_STOP_STRINGS = 4
"""As OpenAI's API: up to 4 stop sequences."""


class ApiError(Exception):
    """A refused request: the HTTP status and OpenAI's error body
    (`{"error": {"message", "type", "param", "code"}}`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def kind(self) -> str:
        """OpenAI's error type: the client's mistake, or the server's trouble."""
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (each has a `serve` option)."""

    max_body_bytes: int = 32 * 2**20
    max_images: int = 8
    max_pixels: int = 4096 * 4096 * 2
    """All the request's images together, counted from their headers before decoding."""
    max_tokens: int = 2048
    """The largest `max_tokens` a request may ask."""
    max_prompt_tokens: int | None = None
    """None: the model's context (its max_position_embeddings)."""
    allow_local_images: Path | None = None
    """The folder `file://` image URLs may name; None refuses them."""


# ----------------------------------------------------------------------------- the schema
# Unknown fields are ignored, as OpenAI-compatible servers do (clients send e.g. `user`);
# the ones that would change the answer and are not supported are refused in `read`.


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageUrl(_Schema):
    url: str
    detail: str | None = None


class ContentPart(_Schema):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | str | None = None


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class ChatRequest(_Schema):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None


# ----------------------------------------------------------------------------- the request


@dataclass
class Completion:
    """A checked request: the conversation as `chat` would ask it, and how to answer."""

    messages: list[Message]
    images: list[Image.Image]
    settings: GenerationSettings
    max_tokens: int | None
    """As asked; None: the server's default, within the context (`prepare` settles it)."""
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    pixels: int = 0
    """The images' pixels, for the log."""
    prompt: Prompt | None = field(default=None, repr=False)
    """Set by `prepare`."""


def parse_body(body: bytes, limits: Limits) -> ChatRequest:
    """The request body as a ChatRequest: 413 past the size limit, 400 for JSON that does not
    parse, 422 (naming each field) for JSON that does not match the schema."""
    if len(body) > limits.max_body_bytes:
        raise too_large(len(body), limits)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object "
                       "like {\"model\": ..., \"messages\": [...]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object with model and messages",
                       code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in err.errors(include_url=False))
        first = err.errors()[0]["loc"] if err.errors() else ()
        raise ApiError(422, f"the request does not match the chat completions schema: "
                       f"{problems}", param=".".join(map(str, first)) or None,
                       code="invalid_request") from None


def too_large(size: int, limits: Limits) -> ApiError:
    return ApiError(413, f"the request body is {size:,} bytes or more; this server takes up to "
                    f"{limits.max_body_bytes:,} (serve --max-body-mb): send smaller images",
                    code="request_too_large")


def read(request: ChatRequest, model_name: str, defaults: GenerationSettings, limits: Limits,
         has_vision: bool) -> Completion:
    """A schema-valid request checked against what this model and server do: the model's
    name, the message order, the images (decoded here), the sampling values."""
    if request.model != model_name:
        raise ApiError(404, f"the model {request.model!r} is not served here; this server "
                       f"serves {model_name!r} (GET /v1/models lists it)", param="model",
                       code="model_not_found")
    if request.n not in (None, 1):
        raise ApiError(400, f"n={request.n}: this server answers one choice per request; send "
                       "n=1 (or several requests)", param="n")
    if request.logprobs:
        raise ApiError(400, "logprobs are not supported; leave logprobs out", param="logprobs")
    if request.tools:
        raise ApiError(400, "tools (function calling) are not supported; leave tools out",
                       param="tools")
    if request.response_format and request.response_format.get("type", "text") != "text":
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported",
                       param="response_format")
    messages, images, pixels = _conversation(request.messages, limits, has_vision)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS or not all(stop):
        raise ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this server allows "
                       f"({limits.max_tokens}, serve --max-tokens-limit)", param="max_tokens")
    changes = {}
    if request.temperature is not None:
        changes["temperature"] = request.temperature
    if request.top_p is not None:
        changes["top_p"] = request.top_p
    return Completion(messages, images, replace(defaults, **changes), max_tokens,
                      tuple(stop), request.seed, request.stream,
                      bool(request.stream_options and request.stream_options.include_usage),
                      pixels)


def prepare(completion: Completion, bundle: ModelBundle, defaults: GenerationSettings,
            limits: Limits) -> Completion:
    """Build the prompt (tokens and tower inputs) and settle `max_tokens` within the model's
    context: a prompt that leaves no room is refused (400, context_length_exceeded)."""
    try:
        prompt = build_prompt(bundle, completion.messages, completion.images)
    except UserError as err:
        raise ApiError(400, str(err)) from None
    context = context_length(bundle)
    limit = min(context - 1, limits.max_prompt_tokens or context)
    if len(prompt.ids) > limit:
        raise ApiError(400, f"the prompt is {len(prompt.ids)} tokens (each image counts its "
                       f"image tokens); this model takes up to {limit}: shorten the "
                       "conversation or send fewer images", param="messages",
                       code="context_length_exceeded")
    # A max_tokens past the room left ends the answer where the context does ("length"), as
    # lmdeploy does; evaluation suites send one number (VLMEvalKit's LMDeployAPI: 16384) to
    # every model.
    room = context - len(prompt.ids)
    max_tokens = min(completion.max_tokens or defaults.max_new_tokens, room)
    settings = replace(completion.settings, max_new_tokens=max_tokens)
    return replace(completion, prompt=prompt, settings=settings, max_tokens=max_tokens)


def context_length(bundle: ModelBundle) -> int:
    """The LLM's context in tokens (its config's max_position_embeddings)."""
    return int(getattr(bundle.model.llm.config, "max_position_embeddings", 0) or 2048)


# ----------------------------------------------------------------------------- messages


def _conversation(messages: list[ChatMessage], limits: Limits,
                  has_vision: bool) -> tuple[list[Message], list[Image.Image], int]:
    """Our messages (images' markers in front of their turn's text), the images, their
    pixels. The order is the template's: a system message first, if any, then user and
    assistant in turn, ending with the user's question."""
    out: list[Message] = []
    images: list[Image.Image] = []
    pixels = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if message.role == "developer" else message.role
        expected = "user" if not out or out[-1]["role"] != "user" else "assistant"
        if role == "system":
            if i > 0:
                raise ApiError(400, f"{where} is a system message; only the first message may "
                               "be one: move it to the front", param=where)
        elif role != expected:
            raise ApiError(400, f"{where} is a {role} message where a {expected} message "
                           "belongs: after the optional system message, user and assistant "
                           "messages take turns, starting and ending with the user",
                           param=where)
        texts, urls = _parts(message, where)
        if urls and role != "user":
            raise ApiError(400, f"{where}: only user messages may hold images", param=where)
        text = "\n".join(texts)
        if IMAGE_TOKEN in text:
            raise ApiError(400, f"{where} contains {IMAGE_TOKEN} in its text; send each image "
                           "as an image_url part instead", param=where)
        for j, url in urls:
            if not has_vision:
                raise ApiError(400, f"{where}.content[{j}] is an image; this model has no "
                               "vision tower and reads text only", param=f"{where}.content")
            if len(images) == limits.max_images:
                raise ApiError(400, f"more than {limits.max_images} images in one request "
                               "(serve --max-images); send fewer",
                               param=f"{where}.content[{j}]")
            image, size = _image(url, f"{where}.content[{j}]", limits, pixels)
            pixels += size
            images.append(image)
        out.append({"role": role, "content": f"{IMAGE_TOKEN}\n" * len(urls) + text})
    if not out or out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's question (the model answers "
                       "it)", param="messages")
    return out, images, pixels


def _parts(message: ChatMessage, where: str) -> tuple[list[str], list[tuple[int, str]]]:
    """A message's texts and its image URLs (with their part index), in order."""
    if message.content is None:
        return [], []
    if isinstance(message.content, str):
        return [message.content], []
    texts, urls = [], []
    for j, part in enumerate(message.content):
        if part.type == "text":
            if part.text is None:
                raise ApiError(400, f"{where}.content[{j}] is a text part without text",
                               param=f"{where}.content[{j}]")
            texts.append(part.text)
        else:
            url = part.image_url.url if isinstance(part.image_url, ImageUrl) else part.image_url
            if not url:
                raise ApiError(400, f"{where}.content[{j}] is an image_url part without a url",
                               param=f"{where}.content[{j}]")
            urls.append((j, url))
    return texts, urls


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),(?P<data>.*)",
                       re.DOTALL)


def _image(url: str, where: str, limits: Limits, pixels: int) -> tuple[Image.Image, int]:
    """The image a URL holds (a base64 data: URL, or a file under --allow-local-images) and
    its pixels; its size, with the request's `pixels` before it, is checked from its header
    before it is decoded."""
    if url.startswith("data:"):
        found = _DATA_URL.fullmatch(url)
        if found is None or ";base64" not in found["params"]:
            raise ApiError(400, f"{where}: a data URL must be base64, as "
                           "data:image/png;base64,<data>", param=where)
        try:
            raw = base64.b64decode(found["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL's base64 does not decode", param=where) \
                from None
        source, name = io.BytesIO(raw), where
    elif url.startswith("file:"):
        source = name = _local_file(url, where, limits)
    else:
        scheme = urlparse(url).scheme or url[:20]
        raise ApiError(400, f"{where}: this server does not fetch image URLs ({scheme}); send "
                       "the image itself as a data URL (data:image/png;base64,<data>)",
                       param=where)
    try:
        width, height = check_upload(source)
        if pixels + width * height > limits.max_pixels:
            raise ApiError(413, f"the request's images hold {pixels + width * height:,} pixels "
                           f"or more; this server takes up to {limits.max_pixels:,} per request "
                           "(serve --max-pixels): send smaller or fewer images", param=where,
                           code="too_many_pixels")
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with warnings.catch_warnings():  # check_upload refused what is past the limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(source, name=name)
    except UserError as err:
        raise ApiError(400, f"{where}: {err}", param=where) from None
    return image, width * height


def _local_file(url: str, where: str, limits: Limits) -> Path:
    if limits.allow_local_images is None:
        raise ApiError(400, f"{where}: file URLs are refused unless the server runs with "
                       "--allow-local-images DIR; send the image as a data URL instead",
                       param=where)
    path = Path(unquote(urlparse(url).path)).resolve()
    folder = limits.allow_local_images.resolve()
    if not path.is_relative_to(folder):
        raise ApiError(400, f"{where}: {path} is outside the folder this server may read "
                       f"images from ({folder}, --allow-local-images)", param=where)
    if not path.is_file():
        raise ApiError(400, f"{where}: {path} is not a file", param=where)
    return path
