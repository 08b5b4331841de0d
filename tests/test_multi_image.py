"""Several images in one conversation: `ChatSession` puts each image's `<image>` marker in
front of the next question asked, `llava-tune chat` takes `--image` more than once and
`/image PATH` mid-conversation, `/reset` forgets the images, and `llava-tune eval` answers
records with several images. A spy on the model's input embeddings (the real generation runs
on) shows which images reach it, in which order."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from llava_tune.assembly.model import load_model
from llava_tune.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_tune.data.image import load_image
from llava_tune.errors import UserError
from llava_tune.inference.chat import NO_IMAGE_NOTE, ChatSession
from llava_tune.inference.generate import GenerationSettings, generate
from llava_tune.models.llava import LlavaModel

SHORT = ["--max-new-tokens", "8"]
QUESTION = "What color is the shape?"
SECOND = "What shape is this?"


@pytest.fixture(scope="module")
def bundle(tiny_finetune_run, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return load_model(tiny_finetune_run)


@pytest.fixture(scope="module")
def images(shapes_data) -> tuple[Path, Path]:
    """Two held-out images (A, B) whose pixels differ."""
    folder = shapes_data / "images" / "heldout"
    return folder / "000000.png", folder / "000001.png"


@pytest.fixture
def seen(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(input ids, pixels) of every prompt the model embeds: generation itself runs as ever."""
    calls = []
    original = LlavaModel.input_embeddings

    def spy(self, input_ids, pixel_values=None, image_features=None, media=None):
        calls.append((input_ids.clone(), None if pixel_values is None else pixel_values.clone()))
        return original(self, input_ids, pixel_values, image_features, media)

    monkeypatch.setattr(LlavaModel, "input_embeddings", spy)
    return calls


def pixels(bundle, *paths: Path) -> torch.Tensor:
    """The pixels of `paths`, in that order, as generation makes them."""
    return torch.cat([bundle.image_processor(load_image(path)) for path in paths])


def session(bundle) -> ChatSession:
    return ChatSession(bundle, settings=GenerationSettings(max_new_tokens=8))


def markers(chat: ChatSession) -> int:
    return sum(m["content"].count(IMAGE_TOKEN) for m in chat.history)


def assert_consistent(chat: ChatSession) -> None:
    """Each asked image has its marker in the history; the others are pending."""
    assert markers(chat) == chat.asked <= len(chat.images) == len(chat.image_paths)
    assert chat.pending_images == chat.image_paths[chat.asked:]


# --------------------------------------------------------------------------- ChatSession


def test_images_attached_before_a_question_all_go_in_front_of_it(bundle, images, seen):
    a, b = images
    assert not torch.equal(*pixels(bundle, a, b))  # else the order could not show
    chat = session(bundle)
    chat.attach_image(a)
    chat.attach_image(b)
    assert chat.image_note is None and chat.pending_images == [a, b]
    asked = chat.messages_for(QUESTION)[-1]
    assert asked == {"role": "user", "content": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{QUESTION}"}

    answer = chat.ask(QUESTION)
    [(ids, given)] = seen
    assert torch.equal(given, pixels(bundle, a, b))
    slots = int((ids == IMAGE_TOKEN_INDEX).sum())
    assert slots == 2 * bundle.model.vision.num_patches
    assert answer == generate(bundle, [asked], [load_image(a), load_image(b)],
                              GenerationSettings(max_new_tokens=8))
    assert chat.history == [asked, {"role": "assistant", "content": answer}]
    assert chat.pending_images == [] and chat.asked == 2
    assert_consistent(chat)

    # The other order: the same question, the images swapped in the prompt.
    swapped = session(bundle)
    swapped.attach_image(b)
    swapped.attach_image(a)
    swapped.ask(QUESTION)
    assert torch.equal(seen[-1][1], pixels(bundle, b, a))


def test_an_image_added_mid_conversation_goes_with_the_next_question(bundle, images, seen):
    a, b = images
    chat = session(bundle)
    chat.attach_image(a)
    first = chat.ask(QUESTION)
    chat.attach_image(b)
    assert chat.pending_images == [b]
    messages = chat.messages_for(SECOND)
    assert [m["content"] for m in messages] == [f"{IMAGE_TOKEN}\n{QUESTION}", first,
                                                f"{IMAGE_TOKEN}\n{SECOND}"]
    second = chat.ask(SECOND)
    assert torch.equal(seen[0][1], pixels(bundle, a))
    assert torch.equal(seen[1][1], pixels(bundle, a, b))  # in the order of their markers
    assert chat.history == [*messages, {"role": "assistant", "content": second}]
    assert_consistent(chat)

    # A question with no new image carries no marker; the images stay in the prompt.
    third = chat.messages_for(QUESTION)[-1]["content"]
    assert third == QUESTION
    chat.ask(QUESTION)
    assert torch.equal(seen[2][1], pixels(bundle, a, b))
    assert_consistent(chat)


class Interrupt:
    """A streamer that stops the answer at its first generated token, as Ctrl-C does (the
    prompt it is given first is empty: generation starts from embeddings)."""

    def put(self, value: torch.Tensor) -> None:
        if value.numel():
            raise KeyboardInterrupt

    def end(self) -> None:
        pass


def test_an_interrupted_answer_keeps_its_images_pending(bundle, images, seen):
    a, b = images
    chat = session(bundle)
    chat.attach_image(a)
    with pytest.raises(KeyboardInterrupt):
        chat.ask(QUESTION, streamer=Interrupt())
    assert chat.history == [] and chat.pending_images == [a]  # no marker consumed
    answered = chat.ask(QUESTION)  # asked again: the image still goes with it
    assert chat.history[0]["content"] == f"{IMAGE_TOKEN}\n{QUESTION}"

    chat.attach_image(b)
    with pytest.raises(KeyboardInterrupt):
        chat.ask(SECOND, streamer=Interrupt())
    assert len(chat.history) == 2 and chat.pending_images == [b]
    assert_consistent(chat)
    chat.ask(SECOND)
    assert chat.history[1]["content"] == answered
    assert chat.history[2]["content"] == f"{IMAGE_TOKEN}\n{SECOND}"
    assert_consistent(chat)
    assert torch.equal(seen[-1][1], pixels(bundle, a, b))


def test_reset_forgets_history_and_images(bundle, images, seen, tmp_path):
    a, b = images
    chat = session(bundle)
    chat.attach_image(a)
    chat.ask(QUESTION)
    chat.attach_image(b)
    chat.reset()
    assert chat.history == [] and chat.images == [] and chat.image_paths == []
    assert chat.image_note == NO_IMAGE_NOTE
    assert chat.messages_for(QUESTION)[-1]["content"] == QUESTION
    chat.ask(QUESTION)
    assert seen[-1][1] is None  # asked with no image at all
    assert_consistent(chat)

    # new=True: a new conversation about this one image.
    chat.attach_image(a)
    chat.ask(QUESTION)
    chat.attach_image(b, new=True)
    assert chat.history == [] and chat.image_paths == [b] and chat.pending_images == [b]
    # An image that cannot be read changes nothing, new or not.
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for path, new in ((bad, False), (bad, True), (tmp_path / "missing.png", True)):
        with pytest.raises(UserError, match=str(path.name)):
            chat.attach_image(path, new=new)
        assert chat.image_paths == [b] and chat.pending_images == [b]


def test_a_typed_image_marker_is_refused(bundle, images):
    chat = session(bundle)
    chat.attach_image(images[0])
    with pytest.raises(UserError, match="cannot contain <image>"):
        chat.ask(f"{IMAGE_TOKEN}\n{QUESTION}")
    assert chat.history == [] and chat.pending_images == [images[0]]


# --------------------------------------------------------------------------- llava-tune chat


def piped(capsys, monkeypatch, model: Path, stdin: str, *args) -> tuple[int, list[str], str]:
    """`llava-tune chat MODEL ARGS` with `stdin` piped in: exit code, answers, stderr."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code, out, err = run_cli(capsys, "chat", model, *SHORT, *args)
    return code, out.removesuffix("\n\n").split("\n\n"), err


def test_chat_cli_two_images_answer_one_question(bundle, tiny_finetune_run, images, capsys,
                                                 tmp_path):
    a, b = images
    code, out, err = run_cli(capsys, "chat", tiny_finetune_run, "--image", a, "--image", b,
                             "--question", QUESTION, *SHORT, "--no-stream")
    assert code == 0, err
    chat = session(bundle)
    chat.attach_image(a)
    chat.attach_image(b)
    assert out == chat.ask(QUESTION) + "\n"
    assert "note:" not in err

    # A bad second path: one clear error naming it, before the model loads.
    missing = tmp_path / "nowhere" / "b.png"
    code, out, err = run_cli(capsys, "chat", tiny_finetune_run, "--image", a, "--image",
                             missing, "--question", QUESTION, *SHORT)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and str(missing) in err and "not found" in err
    assert "Traceback" not in err


def test_chat_cli_image_command_adds_and_reset_forgets(bundle, tiny_finetune_run, images,
                                                       capsys, monkeypatch):
    a, b = images
    stdin = f"{QUESTION}\n/image {b}\n{SECOND}\n/reset\n{QUESTION}\n"
    code, answers, err = piped(capsys, monkeypatch, tiny_finetune_run, stdin, "--image", a,
                               "--no-stream")
    assert code == 0, err
    assert f"(image {b} added; it goes with the next question)" in err
    assert "(new conversation, no images)" in err

    chat = session(bundle)  # the same, step by step
    chat.attach_image(a)
    expected = [chat.ask(QUESTION)]
    chat.attach_image(b)
    expected.append(chat.ask(SECOND))
    assert chat.history[2]["content"] == f"{IMAGE_TOKEN}\n{SECOND}"
    chat.reset()
    expected.append(chat.ask(QUESTION))  # no image any more
    assert answers == expected

    # Two /image before a question: both go with it; the help says what /image does.
    stdin = f"/image {a}\n/image {b}\n{QUESTION}\n/help\n"
    code, answers, err = piped(capsys, monkeypatch, tiny_finetune_run, stdin, "--no-stream")
    assert code == 0, err
    assert f"(image {b} added; 2 images go with the next question)" in err
    assert "/image PATH   add an image to the conversation" in err
    assert "/reset        start a new conversation, without images" in err
    chat = session(bundle)
    chat.attach_image(a)
    chat.attach_image(b)
    assert answers == [chat.ask(QUESTION)]


# --------------------------------------------------------------------------- llava-tune eval


def test_eval_gives_each_question_its_images_in_marker_order(bundle, tiny_finetune_run,
                                                             shapes_data, images, seen,
                                                             capsys, tmp_path):
    folder = shapes_data / "images"
    a, b = (str(path.relative_to(folder)) for path in images)
    two = f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\n{QUESTION}"
    records = [
        {"id": "ab", "image": [a, b], "conversations": [
            {"from": "human", "value": two}, {"from": "gpt", "value": "red"}]},
        {"id": "ba", "image": [b, a], "conversations": [
            {"from": "human", "value": two}, {"from": "gpt", "value": "red"}]},
        # A second image in the second turn: the first turn is asked with A alone.
        {"id": "turns", "image": [a, b], "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{SECOND}"},
            {"from": "gpt", "value": "circle"}]},
    ]
    data, preds = tmp_path / "two.json", tmp_path / "preds.jsonl"
    data.write_text(json.dumps(records))
    code, _, err = run_cli(capsys, "eval", tiny_finetune_run, "--data", data, "--image-folder",
                           folder, "--out", preds, *SHORT)
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["id"], r["turn"], r["question"]) for r in rows] == [
        ("ab", 1, QUESTION), ("ba", 1, QUESTION), ("turns", 1, QUESTION), ("turns", 2, SECOND)]

    # One batch; its images in the order of the questions, each's in the order of its markers.
    [(ids, given)] = seen
    pa, pb = pixels(bundle, *images)
    assert torch.equal(given, torch.stack([pa, pb, pb, pa, pa, pa, pb]))
    slots = (ids == IMAGE_TOKEN_INDEX).sum(dim=1) // bundle.model.vision.num_patches
    assert slots.tolist() == [2, 2, 1, 2]

    # Each prediction is the chat's answer to the same conversation.
    chat = session(bundle)
    for path in images:
        chat.attach_image(path)
    assert rows[0]["prediction"] == chat.ask(QUESTION)
    chat = session(bundle)
    chat.attach_image(images[0])
    assert rows[2]["prediction"] == chat.ask(QUESTION)
