"""`llava-tune web`: a browser chat over the same `ChatSession` as `llava-tune chat`.

One model is built once and shared; every browser session (tab) gets its own `ChatSession`
in a `gr.State`, so conversations never mix, and one lock runs one generation at a time.
`WebChat` holds the page's handlers and knows nothing of gradio, so tests call it directly;
`build_app` wires it into a `gr.Blocks`. gradio is imported only here, and only when a page
is built: `import llava_tune` never needs it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from llava_tune.assembly.model import ModelBundle
from llava_tune.errors import UserError
from llava_tune.inference.chat import LOOP_NOTE, ChatSession
from llava_tune.inference.generate import GenerationSettings, strip_image_markers
from llava_tune.inference.safety import check_host, check_upload

INSTALL_HINT = "pip install -e .[web]"
MAX_UPLOAD = "64mb"
ChatMessages = list[dict[str, str]]
"""What the page's chat box shows: [{"role": "user" | "assistant", "content": text}]."""


def import_gradio():
    """gradio, with its telemetry and update check off; UserError naming the install if it
    is missing."""
    # Read when gradio is imported and when a Blocks is made: no usage reports to the
    # gradio / Hugging Face servers and no check for a newer gradio on PyPI.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    try:
        import gradio
    except ImportError as err:
        raise UserError(f"the web chat needs gradio, which is not installed: {INSTALL_HINT} "
                        "(in the llava-tune checkout)") from err
    return gradio


@dataclass
class Turn:
    """What one step of an answer shows: the conversation and a status line; `failed`:
    the question was not answered (the page keeps it in the question box)."""

    messages: ChatMessages
    status: str = ""
    failed: bool = False


class _Cancelled(Exception):
    """Raised inside generation when the page stopped listening (Stop, closed tab)."""


def _streamer(tokenizer):
    """A TextIteratorStreamer that stops generation at the next token once its `cancelled`
    event is set."""
    from transformers import TextIteratorStreamer

    class Streamer(TextIteratorStreamer):
        def put(self, value):
            if self.cancelled.is_set():
                raise _Cancelled
            super().put(value)

    streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer.cancelled = threading.Event()
    return streamer


class WebChat:
    """The web page's handlers over one built model; plain Python values in and out."""

    def __init__(self, bundle: ModelBundle, system: str | None = None,
                 settings: GenerationSettings | None = None) -> None:
        self.bundle = bundle
        # As `llava-tune chat`: --system, else the run's default (None: the template's).
        self.system = system or bundle.template.default_system
        self.settings = settings or GenerationSettings()
        self.lock = threading.Lock()

    @property
    def has_vision(self) -> bool:
        return self.bundle.model.vision is not None

    def new_session(self) -> ChatSession:
        return ChatSession(self.bundle, system=self.system, settings=replace(self.settings))

    def session(self, session: ChatSession | None) -> ChatSession:
        """The browser session's ChatSession, made on its first use."""
        return session if session is not None else self.new_session()

    @staticmethod
    def shown(session: ChatSession | None) -> ChatMessages:
        """The conversation as the page shows it: no `<image>` markers in the questions."""
        if session is None:
            return []
        return [{"role": m["role"], "content": strip_image_markers(m["content"])
                 if m["role"] == "user" else m["content"]} for m in session.history]

    @staticmethod
    def images(session: ChatSession | None) -> list[str]:
        """The conversation's images, in order: what the page's gallery shows."""
        return [] if session is None else [str(path) for path in session.image_paths]

    def add(self, session: ChatSession | None,
            path: str | Path) -> tuple[ChatSession, bool, str]:
        """Add an image to the conversation: it goes with the next question. A refused image
        (not an image, too many pixels) leaves the conversation and its images as they were.

        Returns (session, whether the image was taken, status text)."""
        session = self.session(session)
        try:
            check_upload(path)
            session.attach_image(path)
        except UserError as err:
            return session, False, f"Error: {err}"
        count = len(session.pending_images)
        images = "it goes" if count == 1 else f"these {count} go"
        return session, True, (f"Image {len(session.images)} of this conversation added; "
                               f"{images} with the next question.")

    def attach(self, session: ChatSession | None,
               path: str | Path | None) -> tuple[ChatSession, bool, str]:
        """A new conversation about this one image (None: about no image).

        Returns (session, whether the image was taken, status text)."""
        session = self.session(session)
        session.reset()
        if path is None:
            return session, True, ""
        # Refused, it leaves no image: the next answer is not about a stale one.
        session, taken, status = self.add(session, path)
        return session, taken, "New conversation about this image." if taken else status

    def clear(self, session: ChatSession | None) -> ChatSession:
        """Forget the conversation and its images."""
        return self.attach(session, None)[0]

    def respond(self, session: ChatSession, question: str, system: str | None = None,
                temperature: float | None = None, top_p: float | None = None,
                max_new_tokens: int | None = None) -> Iterator[Turn]:
        """Answer `question` in the session's conversation, streaming: each Turn shows the
        history, the question and the answer so far; the last one shows the answer exactly as
        `ChatSession.ask` returns it (as `llava-tune chat` prints it). Closing the iterator
        early stops generation at the next token and leaves the history as it was."""
        question = (question or "").strip()
        before = self.shown(session)
        if not question:
            yield Turn(before, "Error: type a question first.", failed=True)
            return
        try:
            session.settings = self._settings(session.settings, temperature, top_p,
                                              max_new_tokens)
        except UserError as err:
            yield Turn(before, f"Error: {err}", failed=True)
            return
        if system is not None and system != (session.system or ""):
            session.set_system(system)
        streamer = _streamer(self.bundle.tokenizer)
        outcome: dict = {}

        def work() -> None:
            try:
                with self.lock:  # one generation at a time on the one model
                    outcome["answer"] = session.ask(question, streamer=streamer)
            except BaseException as err:  # shown in the page; the server goes on
                outcome["error"] = err
                streamer.end()  # generate did not reach it: release the reader

        # As `llava-tune chat` says on stderr: asked without an image, a LLaVA answers from
        # the text alone (and a small one may ramble until LoopStop ends it).
        note = f"Note: {session.image_note}." if session.image_note else ""
        asking = [*before, {"role": "user", "content": question}]
        yield Turn([*asking, {"role": "assistant", "content": ""}],
                   "Waiting for the model..." if self.lock.locked() else note)
        thread = threading.Thread(target=work, name="llava-tune-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield Turn([*asking, {"role": "assistant", "content": text.strip()}], note)
            thread.join()
        finally:
            streamer.cancelled.set()  # no-op once done; stops the thread if we were closed
        if "error" in outcome:
            err = outcome["error"]
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            yield Turn(before, f"Error: no answer ({message})", failed=True)
            return
        if session.stopped_looping:
            note = " ".join(filter(None, [note, f"({LOOP_NOTE[0].upper()}{LOOP_NOTE[1:]}.)"]))
        yield Turn(self.shown(session), note)

    @staticmethod
    def _settings(settings: GenerationSettings, temperature, top_p,
                  max_new_tokens) -> GenerationSettings:
        changes = {}
        if temperature is not None:
            if not 0 <= float(temperature) <= 10:
                raise UserError(f"temperature {temperature} is out of range; use 0 (greedy) "
                                "to 10")
            changes["temperature"] = float(temperature)
        if top_p is not None:
            if not 0 < float(top_p) <= 1:
                raise UserError(f"top-p {top_p} is out of range; use a value in (0, 1]")
            changes["top_p"] = float(top_p)
        if max_new_tokens is not None:
            if int(max_new_tokens) < 1:
                raise UserError(f"max new tokens {max_new_tokens} must be at least 1")
            changes["max_new_tokens"] = int(max_new_tokens)
        return replace(settings, **changes)


def _upload_path(payload) -> str | None:
    """The server-side file of an image upload, as gradio hands it unprocessed."""
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None)


def build_app(bundle: ModelBundle, title: str = "llava-tune", system: str | None = None,
              settings: GenerationSettings | None = None):
    """The chat page: images, conversation, question box, system prompt and sampling controls.

    Returns a `gr.Blocks`; `serve` launches it.
    """
    gr = import_gradio()
    chat = WebChat(bundle, system=system, settings=settings)
    defaults = chat.settings
    generating = {"concurrency_id": "generate", "concurrency_limit": 1}

    with gr.Blocks(title=title, analytics_enabled=False,
                   delete_cache=(3600, 3600)) as app:  # uploads older than an hour go
        state = gr.State(None)  # this tab's ChatSession, made on first use
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                if chat.has_vision:
                    # preprocess=False below: our own checks read the upload, not gradio's
                    # PIL.Image.open, so a bad or huge file gets our message. The box takes
                    # one image at a time and empties again; the gallery shows them all.
                    image = gr.Image(type="filepath", label="Add an image (it goes with the "
                                     "next question)", sources=["upload", "clipboard"],
                                     elem_id="image", height=200, buttons=[])
                    gallery = gr.Gallery(label="Images of this conversation (Clear removes "
                                         "them)", elem_id="images", interactive=False,
                                         columns=4, height=160, buttons=["fullscreen"])
                else:
                    image = gallery = None
                    gr.Markdown("This is a text-only model: it takes no image.",
                                elem_id="text-only")
                system_box = gr.Textbox(value=chat.system or "", label="System prompt",
                                        lines=2, elem_id="system")
                temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                                        label="Temperature (0: greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p",
                                  elem_id="top-p")
                max_new = gr.Slider(1, max(2048, defaults.max_new_tokens),
                                    value=defaults.max_new_tokens, step=1,
                                    label="Max new tokens", elem_id="max-new-tokens")
            with gr.Column(scale=2):
                # No "share" button: it posts to Hugging Face.
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420,
                                     buttons=["copy", "copy_all"])
                status = gr.Markdown("", elem_id="status")
                hint = "Ask about the images" if chat.has_vision else "Ask"
                question = gr.Textbox(label="Question", placeholder=f"{hint}, then press Enter",
                                      elem_id="question", lines=1)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")

        def on_ask(session, text, system_text, temp, p, n):
            session = chat.session(session)
            for turn in chat.respond(session, text, system_text, temp, p, n):
                # The question box empties once the question is taken.
                yield session, turn.messages, turn.status, text if turn.failed else ""

        ask_inputs = [state, question, system_box, temperature, top_p, max_new]
        ask_outputs = [state, chatbot, status, question]
        asks = [question.submit(on_ask, ask_inputs, ask_outputs, **generating),
                send.click(on_ask, ask_inputs, ask_outputs, **generating)]
        stop.click(None, cancels=asks)

        # Clear, and the chat box's own trash button, start over without images (/reset).
        images_out = [image, gallery] if image is not None else []

        def on_clear(session):
            return (chat.clear(session), [], "") + ((None, []) if image is not None else ())

        clear.click(on_clear, [state], [state, chatbot, status, *images_out], cancels=asks)

        def on_chatbot_clear(session):
            return (chat.clear(session), "New conversation, no images.") + (
                (None, []) if image is not None else ())

        chatbot.clear(on_chatbot_clear, [state], [state, status, *images_out], cancels=asks)

        if image is not None:
            def on_image(payload, session):
                path = _upload_path(payload)
                if path is None:
                    return session, gr.skip(), None, gr.skip()
                session, _, note = chat.add(session, path)
                return session, note, None, chat.images(session)

            # In the queue behind a running answer: an image added while it answers goes
            # with the next question.
            image.upload(on_image, [image, state], [state, status, image, gallery],
                         preprocess=False, **generating)
    return app


def serve(bundle: ModelBundle, host: str = "127.0.0.1", port: int = 7860,
          listen_public: bool = False, title: str = "llava-tune", system: str | None = None,
          settings: GenerationSettings | None = None):
    """Start the page on host:port in the background and return the running `gr.Blocks`
    (`.local_url` is its address; `.block_thread()` waits until Ctrl-C, `.close()` stops it).

    A non-loopback `host` needs `listen_public`. Nothing is fetched from the internet (no
    share link, analytics, update check or web fonts) and the browser keeps no run history.
    """
    check_host(host, listen_public)
    app = build_app(bundle, title=title, system=system, settings=settings)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                   prevent_thread_lock=True, quiet=True, show_error=True, ssr_mode=False,
                   max_file_size=MAX_UPLOAD, enable_monitoring=False, run_history=False,
                   footer_links=["settings"], mcp_server=False, pwa=False)
    except OSError as err:  # gradio: "Cannot find empty port in range: 7860-7860 ..."
        raise UserError(f"cannot listen on {host}:{port} (in use by another program, or not "
                        f"an address of this machine); pick another with --port or --host "
                        f"[{str(err).splitlines()[0]}]") from None
    return app
