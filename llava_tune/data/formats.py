"""Read conversation files (LLaVA/ShareGPT, OpenAI, XTuner, Alpaca) and preference files
(TRL's prompt/chosen/rejected, RLAIF-V's question/chosen/rejected) into one record form.

A record is `{"id": str, "images": [relative paths], "kinds": ["image" | "video", ...],
"messages": [{"role", "content"}]}`, and for a preference pair also `"rejected": str`: the
messages end with the chosen answer, and the rejected one would take its place. `images`
lists every visual item in the order of its
marker, and a `<video>` marker becomes an `<image>` marker whose item is a video (a file or
a folder of frames; `kinds` says which), so one slot token and one template serve both.
Each reader checks every record and reports what is wrong with its position in the file, so
a bad record can be skipped and counted, or the whole file refused with the fix.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llava_tune.constants import IMAGE_TOKEN, VIDEO_TOKEN
from llava_tune.data.template import Message, check_roles
from llava_tune.errors import UserError

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}


@dataclass
class Problem:
    """One bad record: where it is and what is wrong."""

    file: Path
    index: int
    record_id: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file} record {self.index}"
        if self.record_id is not None:
            where += f" (id {self.record_id!r})"
        return f"{where}: {self.message}"


@dataclass
class ReadResult:
    records: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    """Position in the file of each of `records` (bad records leave gaps)."""


def read_json_records(path: Path) -> tuple[list[object], list[Problem]]:
    """Objects of a JSON list file or a JSONL file; a JSONL line that does not parse is a
    problem of its own record, a JSON file that does not parse is an error for the file."""
    if not path.is_file():
        raise UserError(f"data file {path} not found; check data.train / --data")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark, as some editors write, is fine
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"data file {path} is not UTF-8 text (byte {err.start}, line {line}: "
                        f"{raw[err.start:err.start + 1]!r}); save it as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path.name} > fixed.json`") from None
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                "fix the file or write it as JSONL, one record per line"
            ) from err
        return records, []
    if stripped.startswith("{") and "\n" in text.strip():
        # One object spread over several lines: not JSONL, whose objects take a line each.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            return [_one_object(path, whole)], []
    records: list[object] = []
    problems: list[Problem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            records.append(None)
            problems.append(Problem(path, len(records) - 1, None,
                                    f"line {number} is not valid JSON ({err.msg})"))
    if len(records) == 1 and isinstance(records[0], dict):
        records[0] = _one_object(path, records[0])
    return records, problems


def _one_object(path: Path, data: dict) -> dict:
    """A file that holds a single JSON object: one record (of a known format or not: the
    format check names its keys), unless it wraps the records, as {"data": [records]} or
    {id: record, ...} do, which is refused with where the records are."""
    if any(key in data for key, _ in FORMATS.values()):
        return data
    lists = [key for key, value in data.items()
             if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)]
    by_id = data and all(isinstance(v, dict) and any(key in v for key, _ in FORMATS.values())
                         for v in data.values())
    if not lists and not by_id:
        return data
    where = (f"the records seem to be under {lists[0]!r}: write that list alone to the file"
             if lists else "the records are the values of one object keyed by id: write them "
             "as a list")
    raise UserError(f"data file {path} holds one JSON object (keys {sorted(data)[:8]}), not a "
                    f"list of records; {where}, as a JSON list [{{...}}, {{...}}] or JSONL, "
                    "one record per line")


def _images(raw: dict) -> list[str]:
    image = raw.get("image", raw.get("images"))
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise ValueError(f"'image' is {image!r}; give an image file path relative to the image "
                         "folder (a string), or a list of them")
    return images


def _videos(raw: dict) -> list[str]:
    video = raw.get("video", raw.get("videos"))
    videos = [] if video is None else [video] if isinstance(video, str) else video
    if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
        raise ValueError(f"'video' is {video!r}; give a video file (or a folder of frames) "
                         "relative to the image folder, or a list of them")
    return videos


def merge_media(messages: list[Message], images: list[str],
                videos: list[str]) -> tuple[list[Message], list[str], list[str]]:
    """`<image>` and `<video>` markers in text order -> (messages with `<image>` markers
    only, every item in marker order, each item's kind). Counts must already match."""
    image_items, video_items = iter(images), iter(videos)
    items, kinds, out = [], [], []
    for message in messages:
        for marker in re.findall(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}",
                                 message["content"]):
            video = marker == VIDEO_TOKEN
            items.append(next(video_items if video else image_items))
            kinds.append("video" if video else "image")
        out.append({**message, "content": message["content"].replace(VIDEO_TOKEN, IMAGE_TOKEN)})
    return out, items, kinds


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def llava_messages(raw: dict) -> list[Message]:
    """LLaVA/ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}."""
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("has no 'conversations' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError("a turn is not {'from': ..., 'value': ...}")
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown speaker {turn['from']!r}; use human or gpt")
        messages.append({"role": role, "content": _text(turn["value"], "a turn's 'value'")})
    return messages


def openai_messages(raw: dict) -> list[Message]:
    """OpenAI chat: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}."""
    turns = raw.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ValueError("has no 'messages' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise ValueError("a message is not {'role': system|user|assistant, 'content': ...}")
        messages.append({"role": turn["role"],
                         "content": _text(turn.get("content"), "a message's 'content'")})
    return messages


def xtuner_messages(raw: dict) -> list[Message]:
    """XTuner: {"conversation": [{"system": ..., "input": ..., "output": ...}, ...]}."""
    turns = raw.get("conversation")
    if not isinstance(turns, list) or not turns:
        raise ValueError("has no 'conversation' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or "input" not in turn or "output" not in turn:
            raise ValueError("a turn is not {'input': ..., 'output': ...}")
        if turn.get("system"):
            messages.append({"role": "system", "content": _text(turn["system"], "'system'")})
        messages.append({"role": "user", "content": _text(turn["input"], "'input'")})
        messages.append({"role": "assistant", "content": _text(turn["output"], "'output'")})
    if sum(m["role"] == "system" for m in messages) > 1 or (
            messages[0]["role"] != "system" and any(m["role"] == "system" for m in messages)):
        raise ValueError("only the first turn may carry a 'system' prompt")
    return messages


def alpaca_messages(raw: dict) -> list[Message]:
    """Alpaca: {"instruction": ..., "input": ... (optional), "output": ..., "system": optional}."""
    instruction = _text(raw.get("instruction"), "'instruction'")
    extra = raw.get("input") or ""
    question = f"{instruction}\n\n{_text(extra, 'input')}" if extra else instruction
    messages = [{"role": "system", "content": _text(raw["system"], "'system'")}] if raw.get("system") else []
    return messages + [{"role": "user", "content": question},
                       {"role": "assistant", "content": _text(raw.get("output"), "'output'")}]


def _part_text(content: object, what: str) -> str:
    """A message's content: a string, or a list of {"type": "text" | "image", ...} parts (TRL's
    and OpenAI's vision form), whose image parts become `<image>` markers in place."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{what} is neither a string nor a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_TOKEN)
        else:
            raise ValueError(f"{what} has a part that is not {{'type': 'text', 'text': ...}} or "
                             "{'type': 'image'}")
    # TRL's parts carry no separators: an image part then a text part is "<image>question".
    return "".join(pieces)


def _turns(value: object, what: str) -> list[Message]:
    """A prompt's or an answer's list of {"role", "content"} messages (content a string or
    parts, see _part_text), checked."""
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{what}: a message is not {{'role': system|user|assistant, "
                             "'content': ...}")
        messages.append({"role": turn["role"],
                         "content": _part_text(turn.get("content"), f"{what}'s content")})
    return messages


def _answer(value: object, key: str) -> str:
    """The text of a chosen or rejected answer: a string, or a list holding one assistant
    message (TRL's conversational form)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = _turns(value, f"'{key}'")
        if len(turns) == 1 and turns[0]["role"] == "assistant":
            return turns[0]["content"]
        raise ValueError(f"'{key}' must be the answer: a string or one assistant message "
                         f"(it has {len(turns)} messages; put the conversation so far in "
                         "'prompt')")
    raise ValueError(f"'{key}' is missing or not a string (the {key} answer)")


def preference_messages(raw: dict) -> list[Message]:
    """A preference pair: TRL's {"prompt", "chosen", "rejected"} (strings or message lists;
    no "prompt": chosen and rejected are whole conversations that differ in the last answer),
    or RLAIF-V's flat {"question", "chosen", "rejected"}. -> the prompt's messages, then the
    chosen answer, which carries the rejected one under "rejected"."""
    chosen, rejected = raw.get("chosen"), raw.get("rejected")
    if "rejected" not in raw:
        raise ValueError("has 'chosen' but no 'rejected' answer; a preference pair needs both")
    if "prompt" in raw or "question" in raw:
        key = "prompt" if "prompt" in raw else "question"
        prompt = raw[key]
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt:
            messages = _turns(prompt, f"'{key}'")
        else:
            raise ValueError(f"'{key}' is empty or neither a string nor a list of messages")
        chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    else:  # implicit prompt: two conversations, the same up to their last answers
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise ValueError("has no 'prompt' (or 'question'): give one, or give 'chosen' and "
                             "'rejected' as whole conversations (lists of messages)")
        chosen_turns, rejected_turns = _turns(chosen, "'chosen'"), _turns(rejected, "'rejected'")
        if chosen_turns[:-1] != rejected_turns[:-1] or not chosen_turns \
                or chosen_turns[-1]["role"] != "assistant" \
                or rejected_turns[-1]["role"] != "assistant":
            raise ValueError("'chosen' and 'rejected' must be the same conversation up to "
                             "their last (assistant) message; or give the shared part as "
                             "'prompt'")
        messages = chosen_turns[:-1]
        chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    if not chosen.strip() or not rejected.strip():
        raise ValueError("has an empty chosen or rejected answer")
    if IMAGE_TOKEN in chosen or IMAGE_TOKEN in rejected:
        raise ValueError(f"an answer holds an {IMAGE_TOKEN} marker; images go in the prompt")
    if chosen.strip() == rejected.strip():
        raise ValueError("its chosen and rejected answers are the same; a pair must differ "
                         "(remove the record)")
    return messages + [{"role": "assistant", "content": chosen, "rejected": rejected}]


FORMATS = {
    # name: (the key that tells it, reader)
    "llava": ("conversations", llava_messages),
    "openai": ("messages", openai_messages),
    "xtuner": ("conversation", xtuner_messages),
    "alpaca": ("instruction", alpaca_messages),
    "preference": ("chosen", preference_messages),
}
FORMAT_HELP = ("'conversations' (LLaVA/ShareGPT), 'messages' (OpenAI), 'conversation' (XTuner), "
               "'instruction'/'input'/'output' (Alpaca) or 'prompt'/'chosen'/'rejected' "
               "(preference pairs, stage dpo)")
PREFERENCE = "preference"
"""The format of preference pairs (stage dpo reads these only; the other stages, these never)."""


def detect_format(path: Path, raws: list[object]) -> str:
    """The format of a file, from its first record that is a JSON object."""
    for index, raw in enumerate(raws):
        if isinstance(raw, dict):
            for name, (key, _) in FORMATS.items():
                if key in raw:
                    return name
            raise UserError(f"{path} record {index} has keys {sorted(raw)[:8]}, which match no "
                            f"known format; each record needs {FORMAT_HELP}")
    kinds = sorted({type(raw).__name__ for raw in raws if raw is not None})
    raise UserError(f"{path} holds no JSON object records (its records are: "
                    f"{', '.join(kinds) or 'unreadable'}); each record must be a JSON object "
                    f"with {FORMAT_HELP}, e.g. {{\"conversations\": [{{\"from\": \"human\", "
                    f"\"value\": ...}}, {{\"from\": \"gpt\", \"value\": ...}}]}}")


def check_record(record: dict, videos: list[str] = ()) -> None:
    """Raise ValueError unless the record can train: roles in order, an answer, and as many
    `<image>` markers as images and `<video>` markers as videos."""
    messages = record["messages"]
    check_roles(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("has no assistant (gpt) turn to learn from; add the answer as a "
                         "'gpt' (or 'assistant') turn after the question, or remove the record")
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if markers != len(record["images"]):
        raise ValueError(
            f"has {markers} {IMAGE_TOKEN} marker(s) but {len(record['images'])} image(s); "
            f"put one {IMAGE_TOKEN} in the text per image"
        )
    markers = sum(m["content"].count(VIDEO_TOKEN) for m in messages)
    if markers != len(videos):
        raise ValueError(
            f"has {markers} {VIDEO_TOKEN} marker(s) but {len(videos)} video(s); put one "
            f"{VIDEO_TOKEN} in the text per video ('video': a file or a folder of frames)"
        )


def _add_markers(messages: list[Message], images: int) -> None:
    """RLAIF-V-style pairs give the image beside a question without a marker: one `<image>`
    per image goes before the first question then (other counts are left to check_record)."""
    if images and not any(IMAGE_TOKEN in m["content"] for m in messages):
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is not None:
            first["content"] = f"{IMAGE_TOKEN}\n" * images + first["content"]


def record_from_raw(raw: object, index: int, read_messages) -> dict:
    """One raw JSON record -> the record form (module docstring), or ValueError saying what is
    wrong with it. `read_messages` is the file's format reader (FORMATS)."""
    if not isinstance(raw, dict):
        raise ValueError("is not a JSON object")
    record = {"id": str(raw.get("id", index)), "images": _images(raw),
              "messages": read_messages(raw)}
    videos = _videos(raw)
    if "rejected" in record["messages"][-1]:
        record["rejected"] = record["messages"][-1].pop("rejected")
        _add_markers(record["messages"], len(record["images"]))
    check_record(record, videos)
    record["messages"], record["images"], record["kinds"] = merge_media(
        record["messages"], record["images"], videos)
    return record


def read_conversations(path: str | Path) -> ReadResult:
    """Read a JSON or JSONL file of conversations in any of FORMATS (detected per file);
    images come from an `image` (or `images`) key, relative to an image folder. Holds the
    whole file: data/prepare.py streams large ones."""
    path = Path(path)
    raws, problems = read_json_records(path)
    read_messages = FORMATS[detect_format(path, raws)][1]
    result = ReadResult(problems=problems)
    for index, raw in enumerate(raws):
        if raw is None:
            continue
        record_id = str(raw.get("id")) if isinstance(raw, dict) and "id" in raw else None
        try:
            record = record_from_raw(raw, index, read_messages)
        except ValueError as err:
            result.problems.append(Problem(path, index, record_id, str(err)))
            continue
        result.records.append(record)
        result.indices.append(index)
    return result


# --------------------------------------------------------------------------- streaming

CHUNK_BYTES = 8 << 20
"""Bytes read at a time when streaming a file's records."""


@dataclass
class RawRecord:
    """One record of a file as its text, before parsing (streamed: see iter_raw_records)."""

    index: int
    text: str | None
    """The record's JSON text; None when it did not parse (then `problem` says why)."""
    problem: str | None = None


def iter_raw_records(path: Path) -> Iterator[RawRecord]:
    """A JSON list or JSONL file's records one at a time, as text, holding one chunk of the
    file (and one record) at a time: a 1 GB LLaVA-665K file never sits in memory whole, nor
    do its parsed objects. Errors for the whole file (not UTF-8, not JSON, empty) are
    UserErrors with the same wording as read_json_records; a JSONL line that does not parse
    is a problem of its record. A file holding one multi-line object is read whole (it is one
    record, or a wrapper read_json_records refuses)."""
    if not path.is_file():
        raise UserError(f"data file {path} not found; check data.train / --data")
    stream = _Chars(path)
    first = stream.first_char()
    if first is None:
        raise UserError(f"data file {path} is empty")
    if first == "[":
        yield from _array_records(path, stream)
        return
    if first == "{" and not stream.first_line_is_an_object():
        raws, problems = read_json_records(path)
        bad = {problem.index: problem.message for problem in problems}
        for index, raw in enumerate(raws):
            yield RawRecord(index, None if raw is None else json.dumps(raw), bad.get(index))
        return
    index = 0
    stream.pos = 0  # back to the first line: line numbers count from the file's start
    for number, line in stream.lines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            yield RawRecord(index, None, f"line {number} is not valid JSON ({err.msg})")
        else:
            yield RawRecord(index, line)
        index += 1


def _array_records(path: Path, stream: _Chars) -> Iterator[RawRecord]:
    decoder = json.JSONDecoder()
    stream.expect("[")
    index = 0
    while True:
        char = stream.next_char()
        if char == "]":
            stream.pos += 1
            if stream.next_char() is not None:
                stream.fail("Extra data", stream.pos)
            return
        if index:
            if char != ",":
                stream.fail("Expecting ',' delimiter", stream.pos)
            stream.pos += 1
            stream.next_char()
        elif char is None:
            stream.fail("Expecting value", stream.pos)
        while True:
            try:
                _, end = decoder.raw_decode(stream.buf, stream.pos)
            except json.JSONDecodeError as err:
                if stream.refill():  # the record may run on in the next chunk
                    continue
                stream.fail(err.msg, err.pos)
            # A value that ends exactly at the chunk's end may be a number cut short.
            if end == len(stream.buf) and stream.refill():
                continue
            break
        yield RawRecord(index, stream.buf[stream.pos:end])
        stream.pos = end
        stream.trim()
        index += 1


class _Chars:
    """A UTF-8 file's text a chunk at a time, with the absolute line of the buffer's start,
    for error messages that point into the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb")  # noqa: SIM115 (closed at the end of the text)
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf = ""
        self.pos = 0
        self.bytes_read = 0
        self.newlines_read = 0
        self.line = 1
        """Line number (1-based) of buf[0]."""
        self.column = 1
        """Column (1-based) of buf[0] on its line."""
        self.eof = False

    def refill(self) -> bool:
        """Append the next chunk to the buffer; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.file.read(CHUNK_BYTES)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            offset = self.bytes_read + err.start
            line = self.newlines_read + chunk[:err.start].count(b"\n") + 1
            raise UserError(
                f"data file {self.path} is not UTF-8 text (byte {offset}, line {line}: "
                f"{chunk[err.start:err.start + 1]!r}); save it as UTF-8, e.g. "
                f"`iconv -f latin1 -t utf-8 {self.path.name} > fixed.json`") from None
        self.bytes_read += len(chunk)
        self.newlines_read += chunk.count(b"\n")
        if not chunk:
            self.eof = True
            self.file.close()
        self.buf += text
        return bool(chunk) or bool(text)

    def next_char(self) -> str | None:
        """The next non-space character (not consumed), None at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.refill():
                return None

    def first_char(self) -> str | None:
        return self.next_char()

    def first_line_is_an_object(self) -> bool:
        """Whether the text is JSONL: its first line parses alone and more lines follow (read
        ahead without consuming). Otherwise the caller reads the file whole, as before."""
        while "\n" not in self.buf[self.pos:] and self.refill():
            pass
        head, newline, rest = self.buf[self.pos:].partition("\n")
        if not newline or not rest.strip():
            return False
        try:
            json.loads(head)
        except json.JSONDecodeError:
            return False
        return True

    def expect(self, char: str) -> None:
        if self.next_char() != char:
            self.fail(f"Expecting {char!r}", self.pos)
        self.pos += 1

    def trim(self) -> None:
        """Drop what was read, keeping the line and column of the buffer's new start."""
        if self.pos < CHUNK_BYTES:
            return
        gone = self.buf[:self.pos]
        newlines = gone.count("\n")
        self.line += newlines
        self.column = (self.column + len(gone)) if not newlines else len(gone) - gone.rfind("\n")
        self.buf, self.pos = self.buf[self.pos:], 0

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text) of every line from the start (JSONL)."""
        number = self.line
        while True:
            end = self.buf.find("\n", self.pos)
            while end < 0 and self.refill():
                end = self.buf.find("\n", self.pos)
            if end < 0:
                if self.pos < len(self.buf):
                    yield number, self.buf[self.pos:]
                return
            yield number, self.buf[self.pos:end]
            number += 1
            self.pos = end + 1
            if self.pos >= CHUNK_BYTES:
                self.buf, self.pos = self.buf[self.pos:], 0

    def fail(self, message: str, pos: int) -> None:
        before = self.buf[:pos]
        newlines = before.count("\n")
        line = self.line + newlines
        column = pos - before.rfind("\n") if newlines else self.column + pos
        raise UserError(f"{self.path} is not valid JSON (line {line}, column {column}: "
                        f"{message}); fix the file or write it as JSONL, one record per line")
