"""`llava-tune web`: the page's handlers on a tiny finetuned run (no browser), and the page
itself in headless Chromium (slow): the answer it shows is `llava-tune chat`'s, two tabs never
share a conversation, bad input gets a message in the page and the server goes on serving,
and the page fetches nothing from outside the machine.

(Over 400 lines: the page's handlers and the browser test share one trained run and app.)
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from llava_tune.assembly.model import load_model
from llava_tune.cli import main
from llava_tune.errors import UserError
from llava_tune.inference.generate import GenerationSettings, LoopStop, generate
from llava_tune.inference.safety import check_host, check_upload, is_loopback
from llava_tune.inference.web import WebChat, _Cancelled

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--max-new-tokens", "8"]
QUESTION = "What color is the shape?"
SECOND = "What shape is this?"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1280,900"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The conversion cache conftest's autouse fixture uses (that one is function-scoped)."""
    return tmp_path_factory.getbasetemp() / "cache"


@pytest.fixture(scope="module")
def bundle(tiny_finetune_run, cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_TUNE_CACHE", str(cache_dir))
        return load_model(tiny_finetune_run)


@pytest.fixture(scope="module")
def image(shapes_data) -> Path:
    return shapes_data / "images" / "heldout" / "000000.png"


@pytest.fixture(scope="module")
def other_image(shapes_data) -> Path:
    return shapes_data / "images" / "heldout" / "000001.png"


def chat_answer(model: Path, cache_dir: Path, *args) -> str:
    """What `llava-tune chat MODEL --question QUESTION ARGS` prints (greedy, 8 tokens)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("LLAVA_TUNE_CACHE", str(cache_dir))
        assert main(["chat", str(model), "--question", QUESTION, *SHORT, *map(str, args)]) == 0
    return out.getvalue().removesuffix("\n")


def piped_answers(model: Path, cache_dir: Path, stdin: str, *args) -> list[str]:
    """The answers `llava-tune chat MODEL ARGS` prints with `stdin` piped in (8 tokens)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("LLAVA_TUNE_CACHE", str(cache_dir))
        mp.setattr(sys, "stdin", io.StringIO(stdin))
        assert main(["chat", str(model), *SHORT, *map(str, args)]) == 0
    return out.getvalue().removesuffix("\n\n").split("\n\n")


@pytest.fixture(scope="module")
def answers(tiny_finetune_run, cache_dir, image) -> dict[str, str]:
    """The references: `llava-tune chat`'s answers with the image and without one."""
    found = {"image": chat_answer(tiny_finetune_run, cache_dir, "--image", image),
             "text": chat_answer(tiny_finetune_run, cache_dir)}
    assert found["image"] and found["text"] and found["image"] != found["text"], found
    return found


def short_chat(bundle) -> WebChat:
    return WebChat(bundle, settings=GenerationSettings(max_new_tokens=8))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: opening it reads the size,
    decoding it fails. A check that decodes says "cannot be read", not "pixels"."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    files = {"text": folder / "notes.png", "huge": folder / "huge.png",
             "big_header": folder / "big.png", "huge_header": folder / "huge-header.png"}
    files["text"].write_text("not an image")
    # A real 20000 x 20000 image (1 bit per pixel: 50 MB to make, 90 KB on disk).
    Image.new("1", (20000, 20000), 1).save(files["huge"])
    files["big_header"].write_bytes(png_header(10000, 10000))  # past PIL's limit, < 2x
    files["huge_header"].write_bytes(png_header(20000, 20000))
    return files


# --------------------------------------------------------------------------- handlers


def test_answer_streams_and_ends_as_chats_answer(bundle, answers, image):
    chat = short_chat(bundle)
    session = chat.new_session()
    session, taken, note = chat.attach(session, image)
    assert taken and "New conversation" in note

    turns = list(chat.respond(session, f"  {QUESTION}\n"))
    asked = {"role": "user", "content": QUESTION}
    assert turns[0].messages == [asked, {"role": "assistant", "content": ""}]
    assert turns[-1].messages == [asked, {"role": "assistant", "content": answers["image"]}]
    assert turns[-1].status == "" and not turns[-1].failed
    for turn in turns[1:-1]:  # the answer so far, growing
        assert turn.messages[:-1] == [asked]
        assert answers["image"].startswith(turn.messages[-1]["content"])
    # The session holds what ChatSession.ask recorded: the image marker on the first question.
    assert session.history[0]["content"].startswith("<image>")

    # Token by token: a longer answer arrives in several growing pieces, and ends as the
    # one generate() gives without a streamer (ended, as in chat, where it starts to loop).
    session, _, _ = chat.attach(session, image)
    turns = list(chat.respond(session, QUESTION, max_new_tokens=40))
    pieces = [t.messages[-1]["content"] for t in turns[1:-1]]
    full = generate(bundle, [{"role": "user", "content": f"<image>\n{QUESTION}"}],
                    session.images, GenerationSettings(max_new_tokens=40),
                    stopping_criteria=[LoopStop()])
    assert turns[-1].messages[-1]["content"] == full
    assert len(set(pieces)) >= 2 and pieces[-1] == full
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:], strict=False))


def test_sessions_are_separate_and_generation_runs_one_at_a_time(bundle, answers, image,
                                                                 monkeypatch):
    chat = short_chat(bundle)
    llm, running, most = bundle.model.llm, [0], [0]
    original = llm.generate

    def counting_generate(*args, **kwargs):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.2)  # room for the other session to start generating too, were it let
        try:
            return original(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(llm, "generate", counting_generate)
    with_image, _, _ = chat.attach(chat.new_session(), image)
    without = chat.new_session()
    results = {}

    def ask(name, session):
        results[name] = list(chat.respond(session, QUESTION))[-1]

    threads = [threading.Thread(target=ask, args=("image", with_image)),
               threading.Thread(target=ask, args=("text", without))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert most[0] == 1  # never two generations at once on the one model
    assert results["image"].messages[-1]["content"] == answers["image"]
    assert results["text"].messages[-1]["content"] == answers["text"]
    assert len(with_image.history) == len(without.history) == 2
    assert without.images == []


def test_stop_ends_generation_and_keeps_the_conversation(bundle, answers, image, monkeypatch):
    chat = short_chat(bundle)
    llm, raised = bundle.model.llm, []
    original = llm.generate

    def watched_generate(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except _Cancelled:
            raised.append("cancelled")
            raise

    monkeypatch.setattr(llm, "generate", watched_generate)
    session, _, _ = chat.attach(chat.new_session(), image)
    turns = chat.respond(session, QUESTION, max_new_tokens=2000)
    for turn in turns:
        if turn.messages[-1]["content"]:
            break  # the answer is streaming: leave, as a closed tab or Stop does
    turns.close()
    assert chat.lock.acquire(timeout=60)  # the generation thread let go of the model
    chat.lock.release()
    assert raised == ["cancelled"]
    assert session.history == []
    # The session goes on: the next question is the first of the conversation.
    final = list(chat.respond(session, QUESTION, max_new_tokens=8))[-1]
    assert final.messages[-1]["content"] == answers["image"]


def test_bad_input_gets_a_message_and_the_chat_goes_on(bundle, answers, image, bad_files):
    chat = short_chat(bundle)
    session = chat.new_session()
    for question in ("", "   \n"):
        [turn] = chat.respond(session, question)
        assert turn.failed and turn.status == "Error: type a question first."
        assert turn.messages == []

    session, taken, note = chat.attach(session, image)
    [turn] = chat.respond(session, QUESTION, temperature=-1)
    assert turn.failed and "temperature -1" in turn.status
    [turn] = chat.respond(session, QUESTION, top_p=0)
    assert turn.failed and "top-p 0" in turn.status
    assert session.history == []

    expected = {
        "text": "not an image that can be read",
        "huge": "this image has 400,000,000 pixels; upload one of at most 89,478,485 pixels",
        "huge_header": "this image has 400,000,000 pixels",
        "big_header": "this image is 10000 x 10000 = 100,000,000 pixels",
    }
    for name, needle in expected.items():
        session, _, _ = chat.attach(session, image)
        list(chat.respond(session, QUESTION))
        session, taken, note = chat.attach(session, bad_files[name])
        assert not taken and note.startswith("Error: ") and needle in note, (name, note)
        assert session.images == [] and session.history == []  # no stale image or answers
    session, taken, _ = chat.attach(session, image)
    assert taken
    assert list(chat.respond(session, QUESTION))[-1].messages[-1]["content"] == answers["image"]


def test_added_images_go_with_the_next_question(bundle, image, other_image, bad_files):
    chat = short_chat(bundle)
    session, taken, note = chat.add(None, image)
    assert taken and note == "Image 1 of this conversation added; it goes with the next question."
    list(chat.respond(session, QUESTION))
    session, taken, note = chat.add(session, other_image)  # mid-conversation
    assert taken and note.startswith("Image 2 of this conversation added; it goes with")
    # Refused images change nothing: the conversation goes on with its images.
    for name in ("text", "huge", "big_header"):
        session, taken, note = chat.add(session, bad_files[name])
        assert not taken and note.startswith("Error: "), name
    assert chat.images(session) == [str(image), str(other_image)]
    assert len(session.history) == 2 and session.pending_images == [other_image]
    last = list(chat.respond(session, SECOND))[-1]

    # As a ChatSession (`llava-tune chat` with `/image PATH` between the questions) answers.
    reference = chat.new_session()
    reference.attach_image(image)
    first = reference.ask(QUESTION)
    reference.attach_image(other_image)
    assert last.messages == [{"role": "user", "content": QUESTION},
                             {"role": "assistant", "content": first},
                             {"role": "user", "content": SECOND},
                             {"role": "assistant", "content": reference.ask(SECOND)}]
    assert session.history == reference.history  # the markers where the images were added
    assert session.history[2]["content"] == f"<image>\n{SECOND}"

    # Clear: no conversation, no images; then two images for the first question.
    session = chat.clear(session)
    assert session.history == [] and chat.images(session) == []
    chat.add(session, image)
    _, taken, note = chat.add(session, other_image)
    assert taken and note.endswith("these 2 go with the next question.")
    list(chat.respond(session, QUESTION))
    assert session.history[0]["content"] == f"<image>\n<image>\n{QUESTION}"
    # attach: a new conversation about one image, as before.
    session, taken, note = chat.attach(session, other_image)
    assert taken and note == "New conversation about this image."
    assert session.history == [] and chat.images(session) == [str(other_image)]


def test_upload_check_reads_only_the_header(bad_files, image):
    check_upload(image)
    for name in ("huge_header", "big_header"):  # no pixel data: decoding would fail
        with pytest.raises(UserError, match="pixels"):
            check_upload(bad_files[name])


def test_only_loopback_without_listen_public(tiny_finetune_run, capsys, monkeypatch):
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.org"]))
    check_host("0.0.0.0", listen_public=True)
    with pytest.raises(UserError, match="--listen-public"):
        check_host("0.0.0.0", listen_public=False)

    # The CLI refuses before it loads the model (or needs gradio).
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["web", str(tiny_finetune_run), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 would let anyone") and "--listen-public" in err


def test_a_busy_port_is_a_user_error(bundle):
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e .[web]")
    from llava_tune.inference.web import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port} .*--port"):
            serve(bundle, port=port)


def test_missing_gradio_names_the_install(tiny_finetune_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["web", str(tiny_finetune_run)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: the web chat needs gradio") and "pip install -e .[web]" in err


def test_import_llava_tune_does_not_import_gradio():
    code = ("import sys, llava_tune, llava_tune.cli, llava_tune.inference.web; "
            "print('gradio' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.stdout.strip() == "False", result.stderr


def test_text_only_model_has_no_image_box(bundle, tiny_lm):
    gr = pytest.importorskip("gradio", reason="gradio is not installed: pip install -e .[web]")
    from llava_tune.inference.web import build_app

    def images(app) -> list:
        return [b for b in app.blocks.values() if isinstance(b, (gr.Image, gr.Gallery))]

    assert sorted(type(b).__name__ for b in images(build_app(bundle))) == ["Gallery", "Image"]
    text_app = build_app(load_model(tiny_lm))
    assert images(text_app) == []
    notes = [b.value for b in text_app.blocks.values() if isinstance(b, gr.Markdown)]
    assert any("text-only model" in str(note) for note in notes)


# --------------------------------------------------------------------------- in a browser


def browser_tools() -> tuple[str, str]:
    """(chromium, chromedriver), or skip saying what is missing."""
    pytest.importorskip("gradio", reason="gradio is not installed: pip install -e .[web]")
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e .[test]")
    chromium = shutil.which("chromium") or ("/usr/bin/chromium"
                                            if os.path.exists("/usr/bin/chromium") else None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium / chromedriver: apt-get install -y chromium chromium-driver")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def web_server(model: Path, cache_dir: Path, log: Path, *args):
    """`llava-tune web MODEL` on a free loopback port; yields its URL once it answers."""
    port = free_port()
    env = {**os.environ, "LLAVA_TUNE_CACHE": str(cache_dir), "PYTHONIOENCODING": "utf-8",
           "TOKENIZERS_PARALLELISM": "false", "GRADIO_TEMP_DIR": str(log.parent / "uploads")}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llava_tune", "web", str(model), "--port", str(port),
             *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def new_browser(chromium: str, driver_path: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # The page's network requests, to check that none leaves the machine.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # An explicit driver path: selenium never looks for (or downloads) a driver itself.
    return webdriver.Chrome(service=Service(driver_path), options=options)


class Page:
    """One tab of the chat page."""

    def __init__(self, driver, handle: str) -> None:
        self.driver, self.handle = driver, handle

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        self.driver.switch_to.window(self.handle)
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition, what: str, timeout: float = 120):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.switch_to.window(self.handle)
        return WebDriverWait(self.driver, timeout, poll_frequency=0.2).until(
            lambda _: condition(), message=f"waiting for {what}; status "
            f"{self.status()!r}, messages {self.messages()}")

    def messages(self) -> list[tuple[str, str]]:
        return [(m.get_attribute("data-testid"), m.text)
                for m in self._find("#chatbot [data-testid='user'], #chatbot [data-testid='bot']")]

    def status(self) -> str:
        found = self._find("#status")
        return found[0].text if found else ""

    def gallery(self) -> list[str]:
        """The sources of the images the conversation's gallery shows (its thumbnails)."""
        return [img.get_attribute("src") for img in self._find("#images button img")]

    def upload(self, path: Path) -> None:
        self._find("#image input[type=file]")[0].send_keys(str(path))

    def ask(self, question: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self._find("#question textarea")[0]
        box.send_keys(question)
        box.send_keys(Keys.ENTER)

    def wait_status(self, text: str) -> None:
        self.wait(lambda: text in self.status(), f"status {text!r}")

    def wait_answer(self, question: str, answer: str, before: int = 0) -> None:
        expected = [("user", question), ("bot", answer)]
        self.wait(lambda: self.messages()[before:] == expected, f"the answer {answer!r}")


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot)), shot
    artifacts = os.environ.get("LLAVA_TUNE_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / name)
    return shot


@pytest.mark.slow
def test_browser_chat(tiny_finetune_run, cache_dir, image, other_image, bad_files, tmp_path):
    chromium, driver_path = browser_tools()
    with web_server(tiny_finetune_run, cache_dir, tmp_path / "server.log", *SHORT) as url:
        # The references, computed while the server loads its model.
        answers = {"image": chat_answer(tiny_finetune_run, cache_dir, "--image", image),
                   "text": chat_answer(tiny_finetune_run, cache_dir),
                   "two": chat_answer(tiny_finetune_run, cache_dir, "--image", image,
                                      "--image", other_image)}
        first_answer, answers["added"] = piped_answers(
            tiny_finetune_run, cache_dir, f"{QUESTION}\n/image {other_image}\n{SECOND}\n",
            "--image", image)
        assert first_answer == answers["image"]
        driver = new_browser(chromium, driver_path, Path(tempfile.mkdtemp(dir=tmp_path)))
        try:
            driver.get(url)
            first = Page(driver, driver.current_window_handle)
            first.wait(lambda: first._find("#image input[type=file]"), "the page")
            assert driver.title == f"llava-tune: {tiny_finetune_run.name}"

            # Tab 1: an image and a question; the answer is `llava-tune chat`'s.
            first.upload(image)
            first.wait_status("Image 1 of this conversation added; it goes with the next "
                              "question.")
            first.wait(lambda: len(first.gallery()) == 1, "the image in the gallery")
            first.ask(QUESTION)
            first.wait_answer(QUESTION, answers["image"])
            assert first._find("#question textarea")[0].get_attribute("value") == ""
            # A second image, added mid-conversation, goes with the next question (as
            # `/image PATH` in chat).
            first.upload(other_image)
            first.wait_status("Image 2 of this conversation added")
            first.wait(lambda: len(first.gallery()) == 2, "both images in the gallery")
            first.ask(SECOND)
            first.wait_answer(SECOND, answers["added"], before=2)
            shot = save_screenshot(driver, tmp_path, "web_chat.png")
            assert shot.stat().st_size > 10_000

            # Tab 2: a session of its own, with none of tab 1's conversation or images.
            driver.switch_to.new_window("tab")
            driver.get(url)
            second = Page(driver, driver.current_window_handle)
            second.wait(lambda: second._find("#question textarea"), "the second page")
            assert second.messages() == [] and second.gallery() == []
            second.ask(QUESTION)  # no image in this tab: the text-only answer
            second.wait_answer(QUESTION, answers["text"])
            second.wait_status("no image attached; answering from the text alone")  # as chat
            assert first.messages()[:2] == [("user", QUESTION), ("bot", answers["image"])]

            # Bad input in tab 2: a message in the page each time, and it goes on serving.
            second._find("#send")[0].click()  # an empty question
            second.wait_status("Error: type a question first.")
            assert len(second.messages()) == 2
            second.upload(bad_files["text"])
            second.wait_status("not an image that can be read")
            second.upload(bad_files["huge"])
            second.wait_status("this image has 400,000,000 pixels; upload one of at most")
            # A refused image changes nothing: the conversation goes on, with no image.
            assert len(second.messages()) == 2 and second.gallery() == []
            save_screenshot(driver, tmp_path, "web_chat_refused.png")

            # Clear, then two images for one question: `chat --image A --image B`'s answer.
            second._find("#clear")[0].click()
            second.wait(lambda: second.messages() == [], "a cleared page")
            second.upload(image)
            second.wait_status("Image 1 of this conversation added")
            second.upload(other_image)
            second.wait_status("Image 2 of this conversation added; these 2 go with the next "
                               "question.")
            second.ask(QUESTION)
            second.wait_answer(QUESTION, answers["two"])
            assert len(second.gallery()) == 2

            # Clear: no conversation, no images; the next answer is the text-only one again.
            second._find("#clear")[0].click()
            second.wait(lambda: second.messages() == [] and second.gallery() == [],
                        "a cleared page")
            second.ask(QUESTION)
            second.wait_answer(QUESTION, answers["text"])

            # Nothing the page loaded or called came from outside this machine.
            import json

            requested = set()
            for entry in driver.get_log("performance"):
                message = json.loads(entry["message"])["message"]
                if message["method"] in ("Network.requestWillBeSent",
                                         "Network.webSocketCreated"):
                    target = message["params"].get("request", message["params"])["url"]
                    if urlparse(target).scheme in ("http", "https", "ws", "wss"):
                        requested.add(target)
            assert requested and all(urlparse(u).netloc == urlparse(url).netloc
                                     for u in requested), sorted(requested)
        finally:
            driver.quit()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log
