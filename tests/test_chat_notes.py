"""Chat and the web page say the same when a LLaVA is asked without an image, and both end an
answer caught in a loop (LoopStop, in their shared ChatSession) instead of letting it run to
max_new_tokens.

The tiny run's own greedy answers after 2 training steps are an accident of its numbers (a
change anywhere upstream, or another CPU, turns a loop into an answer that ends), so the tests
that need a loop, or an answer that ends by itself, script the LLM's next token (`scripted`)
on top of the run's real forward pass."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from llava_tune.assembly.model import load_model
from llava_tune.cli import main
from llava_tune.data.image import load_image
from llava_tune.inference.chat import LOOP_NOTE, NO_IMAGE_NOTE, ChatSession
from llava_tune.inference.generate import GenerationSettings, LoopStop, generate, stop_token_ids
from llava_tune.inference.web import WebChat

QUESTION = "What color is the shape?"
LONG = 200


@pytest.fixture(scope="module")
def bundle(tiny_finetune_run, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return load_model(tiny_finetune_run)


@pytest.fixture(scope="module")
def image(shapes_data):
    return shapes_data / "images" / "heldout" / "000000.png"


def first_loop_end(ids: list[int]) -> int | None:
    """Written out plainly: the first length at which `ids` ends in one block of 1-32 tokens
    repeated 4 times or more, 16 tokens or more in all."""
    for end in range(1, len(ids) + 1):
        for period in range(1, 33):
            span = period * max(4, -(-16 // period))
            if span <= end and ids[end - span:end] == ids[end - period:end] * (span // period):
                return end
    return None


@contextmanager
def scripted(bundle, words: str, then: str):
    """The run answers `words` and then, `then` == "loop", `words` again and again, or, `then`
    == "end", its end-of-turn token: a bonus of 1e4 on the logit of the token that follows the
    previous one in that script (a bigram table, so every generation path, streamed, batched,
    CLI or web, gets the same answer). The model still runs in full underneath."""
    tokens = bundle.tokenizer(words, add_special_tokens=False)["input_ids"]
    assert len(set(tokens)) == len(tokens) >= 3, words  # a bigram table needs distinct tokens
    following = {None: tokens[0], **dict(zip(tokens, tokens[1:], strict=False))}
    following[tokens[-1]] = tokens[0] if then == "loop" else stop_token_ids(bundle)[-1]
    llm = bundle.model.llm
    causal = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    state: dict[str, int | None] = {}

    def remember(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        # The prompt (embeddings, or several ids) starts the script; then one new id a step.
        state["last"] = int(ids[0, -1]) if ids is not None and ids.shape[1] == 1 else None

    def steer(module, args, output):
        output = output.clone()
        output[:, -1, following.get(state["last"], tokens[0])] += 1e4
        return output

    handles = [causal.register_forward_pre_hook(remember, with_kwargs=True),
               causal.get_output_embeddings().register_forward_hook(steer)]
    try:
        yield tokens
    finally:
        for handle in handles:
            handle.remove()


class Collect:
    """A streamer that keeps the generated token ids."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.ids += value.flatten().tolist()

    def end(self) -> None:
        pass


def unstopped(bundle, image) -> tuple[str, list[int]]:
    """The greedy answer to QUESTION with no LoopStop, and its token ids."""
    collect = Collect()
    content = QUESTION if image is None else f"<image>\n{QUESTION}"
    generate(bundle, [{"role": "user", "content": content}],
             [load_image(image)] if image is not None else [],
             GenerationSettings(max_new_tokens=LONG), streamer=collect)
    return bundle.tokenizer.decode(collect.ids, skip_special_tokens=True).strip(), collect.ids


@pytest.mark.parametrize("period, repeats, stops", [
    (1, 15, False), (1, 16, True), (2, 7, False), (2, 8, True), (3, 5, False), (3, 6, True),
    (5, 3, False), (5, 4, True), (32, 4, True), (33, 4, False), (33, 5, False)])
def test_loop_stop_needs_4_repeats_and_16_tokens(period, repeats, stops):
    block = list(range(10, 10 + period))
    ids = torch.tensor([[7, 8, 9] + block * repeats, [7, 8, 9] + list(range(40, 40 + period
                                                                              * repeats))])
    loop = LoopStop()
    assert loop(ids, None).tolist() == [stops, False]
    assert loop.stopped == stops


def test_chat_session_ends_an_answer_caught_in_a_loop(bundle):
    with scripted(bundle, " red blue green", then="loop") as words:
        text, ids = unstopped(bundle, None)
        end = first_loop_end(ids)
        period = len(words)
        assert ids[:2 * period] == words * 2 and len(ids) == LONG
        assert end == period * max(4, -(-16 // period))  # 4 repeats, 16 tokens or more
        session = ChatSession(bundle, settings=GenerationSettings(max_new_tokens=LONG))
        assert session.image_note == NO_IMAGE_NOTE
        answer = session.ask(QUESTION)
    assert session.stopped_looping
    assert answer == bundle.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
    assert text.startswith(answer) and len(answer) < len(text)


def test_cli_and_web_say_the_same_and_stop_the_same(bundle, tiny_finetune_run, image, capsys,
                                                    monkeypatch):
    with scripted(bundle, " red blue green", then="loop"):
        session = ChatSession(bundle, settings=GenerationSettings(max_new_tokens=LONG))
        answer = session.ask(QUESTION)
        assert session.stopped_looping

        # The CLI loads the run itself: it gets this (scripted) bundle of the same run.
        import llava_tune.assembly.model as assembly
        monkeypatch.setattr(assembly, "load_model", lambda *args, **kwargs: bundle)
        assert main(["chat", str(tiny_finetune_run), "--question", QUESTION,
                     "--max-new-tokens", str(LONG), "--no-stream"]) == 0
        out, err = capsys.readouterr()
        assert out == answer + "\n"
        assert f"note: {NO_IMAGE_NOTE}" in err and f"({LOOP_NOTE})" in err

        chat = WebChat(bundle, settings=GenerationSettings(max_new_tokens=LONG))
        turns = list(chat.respond(chat.new_session(), QUESTION))
        assert turns[-1].messages[-1]["content"] == answer
        assert NO_IMAGE_NOTE in turns[-1].status and LOOP_NOTE[1:] in turns[-1].status
        assert all(NO_IMAGE_NOTE in turn.status for turn in turns)  # shown while it answers too

    # With the image: no note about it.
    web_session, taken, _ = chat.attach(None, image)
    assert taken and web_session.image_note is None
    last = list(chat.respond(web_session, QUESTION, max_new_tokens=8))[-1]
    assert NO_IMAGE_NOTE not in last.status


def test_an_answer_that_ends_by_itself_is_not_cut(bundle, image):
    """An answer that ends with its end-of-turn token before any loop is left whole."""
    with scripted(bundle, " red blue green", then="end") as words:
        collect = Collect()
        generate(bundle, [{"role": "user", "content": "<image>\nWhat shape is this?"}],
                 [load_image(image)], GenerationSettings(max_new_tokens=LONG), streamer=collect)
        assert collect.ids[:len(words)] == words and len(collect.ids) <= len(words) + 1  # + stop
        session = ChatSession(bundle, settings=GenerationSettings(max_new_tokens=LONG))
        session.attach_image(image)
        answer = session.ask("What shape is this?")
    assert not session.stopped_looping
    assert answer == bundle.tokenizer.decode(collect.ids, skip_special_tokens=True).strip()
