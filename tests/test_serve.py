"""`llava-tune serve`, as a program calls it: the official `openai` client against the API
server over a tiny finetune run. Answers (one-shot and streamed) equal `chat`'s greedy
answers; concurrent clients each get their own answer, in fewer batches than requests;
every bad request gets OpenAI's error shape and the server goes on serving."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from llava_tune.assembly.model import load_model
from llava_tune.cli import main
from llava_tune.errors import UserError
from llava_tune.inference.api import Limits
from llava_tune.inference.batching import Batcher, Delta, Done, Job
from llava_tune.inference.chat import ChatSession
from llava_tune.inference.generate import GenerationSettings, build_prompt
from llava_tune.inference.server import ApiServer, ServeOptions

QUESTIONS = ["What color is the shape?", "What shape is this?"]
TEXT_ONLY = ["Is it red?", "Name the shape in one word.", "circle square star", "12345",
             "Why?", "Describe it."]
"""Questions without an image: the tiny model's answers to these differ from each other
(with an image, the barely trained model answers every question alike)."""
SETTINGS = GenerationSettings(max_new_tokens=12)
NAME = "tiny"


@pytest.fixture(scope="module")
def bundle(tiny_finetune_run):
    return load_model(tiny_finetune_run)


@pytest.fixture(scope="module")
def images(shapes_data) -> list[Path]:
    return sorted((shapes_data / "images" / "heldout").glob("*.png"))[:4]


def _server(bundle, **changes) -> ApiServer:
    options = {"model_name": NAME, "defaults": SETTINGS, "limits": Limits(), "max_batch": 8,
               "max_queue": 64, **changes}
    return ApiServer(bundle, ServeOptions(**options), port=0).start()


@pytest.fixture(scope="module")
def server(bundle):
    server = _server(bundle, limits=Limits(max_images=2, max_pixels=200_000,
                                           max_body_bytes=300_000, max_tokens=64))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def data_url(path: Path | Image.Image) -> str:
    image = path if isinstance(path, Image.Image) else Image.open(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(image: Path | None, question: str) -> list[dict]:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]


def chat_answer(bundle, image: Path | None, question: str) -> str:
    """What `llava-tune chat --image IMAGE --question QUESTION` answers (greedy)."""
    session = ChatSession(bundle, system=bundle.template.default_system,
                          settings=SETTINGS)
    if image is not None:
        session.attach_image(image)
    return session.ask(question)


@pytest.fixture(scope="module")
def expected(bundle, images) -> dict[tuple[Path | None, str], str]:
    answers = {(image, q): chat_answer(bundle, image, q) for image in images for q in QUESTIONS}
    answers.update({(None, q): chat_answer(bundle, None, q) for q in TEXT_ONLY})
    assert len({answers[None, q] for q in TEXT_ONLY}) == len(TEXT_ONLY)
    return answers


# --------------------------------------------------------------------------- answers


def test_answers_equal_chat_one_shot_and_streamed(client, bundle, images, expected):
    image, question = images[0], QUESTIONS[0]
    answer = client.chat.completions.create(model=NAME, messages=ask(image, question))
    assert answer.choices[0].message.content == expected[image, question]
    assert answer.choices[0].finish_reason in ("stop", "length")
    prompt = build_prompt(bundle, [{"role": "user", "content": f"<image>\n{question}"}],
                          [Image.open(image).convert("RGB")])
    assert answer.usage.prompt_tokens == len(prompt.ids)
    assert 1 <= answer.usage.completion_tokens <= SETTINGS.max_new_tokens
    assert answer.usage.total_tokens == len(prompt.ids) + answer.usage.completion_tokens

    stream = client.chat.completions.create(model=NAME, messages=ask(image, question),
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[image, question]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        answer.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [NAME]


def test_a_conversation_and_sampling_settings(client, bundle, images):
    image = images[1]
    session = ChatSession(bundle, system="Answer briefly.", settings=SETTINGS)
    session.attach_image(image)
    first, second = session.ask(QUESTIONS[0]), session.ask(QUESTIONS[1])
    messages = [{"role": "system", "content": "Answer briefly."}, *ask(image, QUESTIONS[0]),
                {"role": "assistant", "content": first},
                {"role": "user", "content": QUESTIONS[1]}]
    answer = client.chat.completions.create(model=NAME, messages=messages)
    assert answer.choices[0].message.content == second
    # max_tokens cuts the answer: finish_reason "length"
    short = client.chat.completions.create(model=NAME, messages=ask(image, QUESTIONS[0]),
                                           max_tokens=1)
    assert short.usage.completion_tokens == 1
    assert short.choices[0].finish_reason in ("length", "stop")
    # the same seed, the same sampled answer
    sampled = [client.chat.completions.create(model=NAME, messages=ask(image, QUESTIONS[1]),
                                              temperature=1.5, top_p=0.9, seed=7)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_stop_strings_end_the_answer(client, images, expected):
    image, question = images[0], QUESTIONS[0]
    full = expected[image, question]
    if len(full) < 3:
        pytest.skip(f"the tiny model's answer {full!r} is too short to cut")
    stop = full[2:4]
    cut = full[:full.find(stop)].strip()
    answer = client.chat.completions.create(model=NAME, messages=ask(image, question),
                                            stop=[stop])
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=ask(image, question), stop=stop, stream=True))
    assert streamed == cut


def test_concurrent_clients_each_get_their_own_answer(server, client, images, expected):
    """8 clients at once, 2 requests each (alternating streamed and not): every answer is
    the one `chat` gives that question (six distinct answers, two with images), and the
    batcher answered them in fewer generations than requests."""
    jobs = [(None, q) for q in TEXT_ONLY] + [(images[0], QUESTIONS[0]), (images[1], QUESTIONS[1])]
    answers: dict[int, list[str]] = {i: [] for i in range(8)}
    errors = []
    batches_before = server.batcher.batches

    def user(i: int) -> None:
        image, question = jobs[i]
        try:
            for round_ in range(2):
                if (i + round_) % 2:
                    chunks = client.chat.completions.create(
                        model=NAME, messages=ask(image, question), stream=True)
                    answers[i].append("".join(c.choices[0].delta.content or "" for c in chunks))
                else:
                    answers[i].append(client.chat.completions.create(
                        model=NAME, messages=ask(image, question)).choices[0].message.content)
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and time.monotonic() - start < 120
    for i, (image, question) in enumerate(jobs):
        assert answers[i] == [expected[image, question]] * 2, (i, image, question)
    assert server.batcher.batches - batches_before < 16


# --------------------------------------------------------------------------- bad requests


def _post(server, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


def _png(size: tuple[int, int]) -> str:
    return data_url(Image.new("RGB", size, (200, 30, 30)))


def bad_requests(image: Path, outside: Path) -> dict[str, tuple[object, int, str]]:
    """name: (body, status, words the message must hold)."""
    good = ask(image, QUESTIONS[0])
    one = {"type": "image_url", "image_url": {"url": data_url(image)}}
    return {
        "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        "not an object": (b'[1, 2]', 400, "JSON object"),
        "no messages": ({"model": NAME}, 422, "messages"),
        "temperature out of range": ({"model": NAME, "messages": good, "temperature": 5}, 422,
                                     "temperature"),
        "unknown model": ({"model": "gpt-4o", "messages": good}, 404, "not served here"),
        "assistant first": ({"model": NAME, "messages": [
            {"role": "assistant", "content": "hi"}, *good]}, 400, "take turns"),
        "ends with the assistant": ({"model": NAME, "messages": [
            *good, {"role": "assistant", "content": "red"}]}, 400, "last message"),
        "system in the middle": ({"model": NAME, "messages": [
            *good, {"role": "assistant", "content": "red"},
            {"role": "system", "content": "x"}]}, 400, "only the first"),
        "an image URL to fetch": ({"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}},
            {"type": "text", "text": "hi"}]}]}, 400, "data URL"),
        "a file URL without --allow-local-images": ({"model": NAME, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": f"file://{outside}"}}, {"type": "text", "text": "hi"}]}]}, 400,
            "--allow-local-images"),
        "an image that does not decode": ({"model": NAME, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}},
                {"type": "text", "text": "hi"}]}]}, 400, "not an image"),
        "base64 that does not decode": ({"model": NAME, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}},
                        {"type": "text", "text": "hi"}]}]}, 400, "base64"),
        "too many images": ({"model": NAME, "messages": [{"role": "user", "content": [
            one, one, one, {"type": "text", "text": "hi"}]}]}, 400, "more than 2 images"),
        "too many pixels": ({"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png((500, 500))}},
            {"type": "text", "text": "hi"}]}]}, 413, "pixels"),
        "an image in the text": ({"model": NAME, "messages": [
            {"role": "user", "content": "<image>\nhi"}]}, 400, "image_url part"),
        "max_tokens past the limit": ({"model": NAME, "messages": good, "max_tokens": 65}, 400,
                                      "max_tokens=65"),
        "a prompt longer than the context": ({"model": NAME, "messages": [
            {"role": "user", "content": "blue " * 2000}]}, 400, "this model takes up to"),
        "n=2": ({"model": NAME, "messages": good, "n": 2}, 400, "n=1"),
        "a body too large": (json.dumps({"model": NAME, "messages": good,
                                         "pad": "x" * 400_000}).encode(), 413, "bytes"),
    }


def test_each_bad_request_gets_its_error_and_the_server_goes_on(server, client, images,
                                                                 expected, tmp_path):
    outside = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(outside)
    for name, (body, status, words) in bad_requests(images[0], outside).items():
        response = _post(server, body)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert words in error["message"], (name, error)
        assert error["type"] == "invalid_request_error" and "Traceback" not in response.text
    # the official client raises its own error types for them
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ask(images[0], QUESTIONS[0]))
    with pytest.raises(openai.BadRequestError, match="take turns"):
        client.chat.completions.create(model=NAME, messages=[
            {"role": "assistant", "content": "hi"}])
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["code"] == "not_found"
    answer = client.chat.completions.create(model=NAME, messages=ask(images[0], QUESTIONS[0]))
    assert answer.choices[0].message.content == expected[images[0], QUESTIONS[0]]


def test_local_images_only_under_the_allowed_folder(bundle, images, expected, tmp_path):
    server = _server(bundle, limits=Limits(allow_local_images=images[0].parent))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"file://{images[0]}"}},
            {"type": "text", "text": QUESTIONS[0]}]}]
        answer = client.chat.completions.create(model=NAME, messages=messages)
        assert answer.choices[0].message.content == expected[images[0], QUESTIONS[0]]
        escape = f"file://{images[0].parent}/../../{images[0].parent.name}/x.png"
        messages[0]["content"][0]["image_url"]["url"] = escape
        with pytest.raises(openai.BadRequestError, match="outside the folder"):
            client.chat.completions.create(model=NAME, messages=messages)
    finally:
        server.close()


def test_api_key_on_every_request(bundle, images):
    server = _server(bundle, api_key="s3cret")
    try:
        url = f"{server.url}/v1"
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for response in (httpx.get(f"{url}/models", headers=headers),
                             _post(server, {"model": NAME, "messages": []}, headers)):
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/health").status_code == 200
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=ask(images[0], "hi")).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
    finally:
        server.close()


def test_a_full_queue_answers_503_with_retry_after(bundle, images):
    server = _server(bundle, max_batch=1, max_queue=1)
    release = threading.Event()
    generate = server.batcher._generate

    def held(batch):
        release.wait(30)
        generate(batch)

    server.batcher._generate = held
    body = {"model": NAME, "messages": ask(images[0], QUESTIONS[0])}
    try:
        results = []
        first = threading.Thread(target=lambda: results.append(_post(server, body)))
        first.start()
        _until(lambda: server.batcher.running == 1)
        second = threading.Thread(target=lambda: results.append(_post(server, body)))
        second.start()
        _until(lambda: server.batcher.waiting == 1)
        refused = _post(server, body)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "server_busy"
        release.set()
        first.join(60)
        second.join(60)
        assert [r.status_code for r in results] == [200, 200]
    finally:
        release.set()
        server.close()


def test_a_client_gone_mid_stream_frees_its_row(server, client, images, expected):
    body = {"model": NAME, "messages": ask(images[0], QUESTIONS[0]), "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    _until(lambda: server.batcher.running == 0 and server.batcher.waiting == 0)
    answer = client.chat.completions.create(model=NAME, messages=ask(images[0], QUESTIONS[0]))
    assert answer.choices[0].message.content == expected[images[0], QUESTIONS[0]]


def test_a_cancelled_row_ends_at_its_next_token(bundle, images):
    """Batcher alone: the job cancelled at its first token gets no more events, and its
    neighbour in the batch still gets its whole answer."""
    batcher = Batcher(bundle, max_batch=2)
    prompt = build_prompt(bundle, [{"role": "user", "content": f"<image>\n{QUESTIONS[0]}"}],
                          [Image.open(images[0]).convert("RGB")])
    long = GenerationSettings(max_new_tokens=40, repetition_penalty=1.3)  # no loop, no early end
    events: dict[str, list] = {"gone": [], "stays": []}
    done = threading.Event()

    def gone(event):
        events["gone"].append(event)
        gone_job.cancel()

    def stays(event):
        events["stays"].append(event)
        if isinstance(event, Done):
            done.set()

    gone_job = Job(prompt, long, gone)
    stay_job = Job(prompt, long, stays)
    batcher._ready.acquire()  # both wait until both are queued: one batch
    try:
        batcher._waiting.extend([gone_job, stay_job])
        batcher._ready.notify()
    finally:
        batcher._ready.release()
    assert done.wait(60)
    batcher.close()
    assert len(events["gone"]) <= 1 and not any(isinstance(e, Done) for e in events["gone"])
    final = events["stays"][-1]
    assert "".join(e.text for e in events["stays"] if isinstance(e, Delta)) == final.text


def _until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------- the command


def test_serve_refuses_before_loading(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--listen-public" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-images", "0", "--allow-local-images",
                 str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--max-images 0" in err and "is not a folder" in err


def test_port_in_use_is_a_user_error(bundle, server):
    with pytest.raises(UserError, match="--port"):
        ApiServer(bundle, ServeOptions(NAME, SETTINGS), port=server.port)


# --------------------------------------------------------------------------- evaluation suites
# What lmms-eval 0.7.3 (`--model openai`, its chat class) and VLMEvalKit (e8e78f05, its GPT4V
# and LMDeployAPI classes) send, as logged from them against a stub server: images before
# the text in one user message (PNG from lmms-eval, JPEG with `detail` from VLMEvalKit), the
# sampling fields each sets, never `stop` or `stream`.


def _jpeg(image: Path, tmp_path: Path) -> tuple[str, Path]:
    """VLMEvalKit's encoding of `image` and the decoded JPEG as a file (what chat would see)."""
    buffer = io.BytesIO()
    Image.open(image).convert("RGB").save(buffer, format="JPEG")
    path = tmp_path / f"{image.stem}.jpg"
    path.write_bytes(buffer.getvalue())
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), path


def test_what_lmms_eval_and_vlmevalkit_send(server, bundle, images, tmp_path):
    two = ChatSession(bundle, system=bundle.template.default_system, settings=SETTINGS)
    two.attach_image(images[0])
    two.attach_image(images[1])
    lmms_chat = {"model": NAME, "max_tokens": 12, "seed": 1234, "temperature": 0.0, "top_p": 1.0,
                 "messages": [{"role": "user", "content": [
                     {"type": "image_url", "image_url": {"url": data_url(images[0])}},
                     {"type": "image_url", "image_url": {"url": data_url(images[1])}},
                     {"type": "text", "text": QUESTIONS[0]}]}]}
    lmms_simple = {"model": NAME, "max_tokens": 12, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]},
                                     {"type": "image_url", "image_url": {
                                         "url": data_url(images[2])}}]}]}
    url, jpeg = _jpeg(images[3], tmp_path)
    vlmevalkit = {"model": NAME, "temperature": 0, "top_p": 1.0, "max_tokens": 12,
                  "messages": [{"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                      {"type": "text", "text": QUESTIONS[0]}]}]}
    expected = [two.ask(QUESTIONS[0]), chat_answer(bundle, images[2], QUESTIONS[1]),
                chat_answer(bundle, jpeg, QUESTIONS[0])]
    headers = {"Authorization": "Bearer sk-test"}  # both always send a key
    for body, answer in zip([lmms_chat, lmms_simple, vlmevalkit], expected, strict=True):
        response = _post(server, body, headers)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == answer
    # VLMEvalKit's LMDeployAPI asks every model for 16384 tokens and n=1: past this server's
    # --max-tokens-limit (64 here), the error names the option to raise.
    lmdeploy_api = {**vlmevalkit, "n": 1, "max_tokens": 16384}
    response = _post(server, lmdeploy_api, headers)
    assert response.status_code == 400 and "--max-tokens-limit" in response.text


def test_a_max_tokens_past_the_context_ends_where_the_context_does(bundle):
    from llava_tune.inference.api import Completion, context_length, prepare

    question = [{"role": "user", "content": "blue " * 100}]
    prompt = build_prompt(bundle, question, [])
    room = context_length(bundle) - len(prompt.ids)
    completion = prepare(Completion(question, [], SETTINGS, max_tokens=10_000), bundle,
                         SETTINGS, Limits(max_tokens=10_000))
    assert completion.settings.max_new_tokens == completion.max_tokens == room


@pytest.mark.skipif(not os.environ.get("LLAVA_TUNE_LMMS_EVAL_PYTHON"),
                    reason="lmms-eval lives in its own environment (it pins av<16 and "
                    "protobuf<7, and needs filelock<4): set LLAVA_TUNE_LMMS_EVAL_PYTHON to "
                    "its python to run it (README, Serve)")
def test_lmms_eval_against_serve(server, bundle, shapes_data, tmp_path):
    """lmms-eval itself, its OpenAI-compatible model on a task of held-out shapes questions
    written by scripts/lmms_eval_task.py: every answer it logged is chat's."""
    import lmms_eval_task

    task = lmms_eval_task.write_task(tmp_path / "task", shapes_data / "heldout.json",
                                     shapes_data / "images", limit=6, max_new_tokens=12)
    out = tmp_path / "out"
    subprocess.run([os.environ["LLAVA_TUNE_LMMS_EVAL_PYTHON"], "-m", "lmms_eval", "--model",
                    "openai", "--model_args", f"model={NAME},base_url={server.url}/v1,"
                    "api_key=none,num_concurrent=3,max_retries=1", "--tasks",
                    "llava_tune_shapes", "--include_path", str(task), "--batch_size", "1",
                    "--output_path", str(out), "--log_samples"], check=True, timeout=600,
                   cwd=tmp_path)
    samples = [json.loads(line) for path in out.rglob("*llava_tune_shapes*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == 6, list(out.rglob("*"))
    for sample in samples:  # lmms-eval 0.7.3 logs the question, the image files, the answer
        [image] = sample["input_media"]
        assert sample["filtered_resps"] == chat_answer(bundle, Path(image), sample["input"])
