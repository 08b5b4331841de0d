"""A chat session with one model: history, images, system prompt. No I/O: the CLI reads and
prints, so the same session serves the terminal, pipes and tests."""

from __future__ import annotations

from pathlib import Path

from llava_tune.assembly.model import ModelBundle
from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.image import load_image
from llava_tune.data.template import Message
from llava_tune.data.video import load_video
from llava_tune.errors import UserError
from llava_tune.inference.generate import GenerationSettings, LoopStop, generate

NO_IMAGE_NOTE = "no image attached; answering from the text alone"
"""Said (by chat and the web page) when a model with a vision tower is asked without one."""
LOOP_NOTE = "answer stopped: it kept repeating itself"
"""Said when LoopStop ended an answer."""


class ChatSession:
    """Multi-turn conversation with any number of images.

    An attached image belongs to the next question asked: its `<image>` marker goes in front
    of that question (one marker per image attached since the last answered question), so
    the images stay in the order of their markers in the conversation. `images[:asked]` have
    their markers in `history`; `pending_images` wait for the next question.
    """

    def __init__(self, bundle: ModelBundle, system: str | None = None,
                 settings: GenerationSettings | None = None) -> None:
        self.bundle = bundle
        self.system = system
        self.settings = settings or GenerationSettings()
        self.images: list = []
        """The conversation's images (PIL; a video: its frames, a list), in the order of
        their markers."""
        self.image_paths: list[Path] = []
        """Where each of `images` came from."""
        self.asked = 0
        """How many of `images` have their marker in `history` (the rest are pending)."""
        self.history: list[Message] = []
        self._conversation = object()
        """Replaced by reset(): an answer that ends after a reset does not join the new
        conversation (the web page's Clear can land while an answer finishes)."""
        self.stopped_looping = False
        """Whether the last answer was ended because it kept repeating itself."""

    @property
    def has_vision(self) -> bool:
        return self.bundle.model.vision is not None

    @property
    def image_note(self) -> str | None:
        """NO_IMAGE_NOTE when the model could see images but has none; else None."""
        return NO_IMAGE_NOTE if self.has_vision and not self.images else None

    @property
    def pending_images(self) -> list[Path]:
        """The images that go with the next question (attached since the last answer)."""
        return self.image_paths[self.asked:]

    def attach_image(self, path: str | Path, new: bool = False) -> None:
        """Add an image to the conversation: it goes with the next question. `new`: start a
        new conversation with this image instead. An image that cannot be read raises
        UserError and changes nothing."""
        if not self.has_vision:
            raise UserError("this model has no vision tower; it chats about text only")
        image = load_image(path)
        if new:
            self.reset()
        self.images.append(image)
        self.image_paths.append(Path(path))

    def attach_video(self, path: str | Path, new: bool = False) -> None:
        """Add a video (a file, or a folder of frames) as attach_image adds an image: its
        frames, as many as the model reads (data.video_frames), go with the next question.
        A video that does not decode, or has too few frames, raises UserError naming it."""
        if not self.has_vision:
            raise UserError("this model has no vision tower; it chats about text only")
        frames = load_video(path, self.bundle.model.layout.video_frames)
        if new:
            self.reset()
        self.images.append(frames)
        self.image_paths.append(Path(path))

    def reset(self) -> None:
        """Start over: no history and no images."""
        self.history = []
        self.images, self.image_paths, self.asked = [], [], 0
        self._conversation = object()

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt; empty text clears it (the run's default too)."""
        self.system = text or ""

    def messages_for(self, question: str) -> list[Message]:
        """The conversation so far plus `question` (the pending images' markers in front of
        it), as the template wants it."""
        if self.has_vision and IMAGE_TOKEN in question:
            raise UserError(f"a question cannot contain {IMAGE_TOKEN}: attach images instead "
                            "(each goes with the next question)")
        # None: the template's default applies; "" overrides that default with none.
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        question = f"{IMAGE_TOKEN}\n" * len(self.pending_images) + question
        return messages + self.history + [{"role": "user", "content": question}]

    def ask(self, question: str, streamer=None) -> str:
        """Answer `question` in context; the turn (and its pending images' markers) joins the
        history only once answered, so an interrupted answer leaves the conversation as it
        was, those images still pending. An answer caught in a loop ends there (LoopStop;
        `stopped_looping` says so): a person is waiting for it."""
        messages = self.messages_for(question)
        images, conversation = list(self.images), self._conversation
        loop = LoopStop()
        answer = generate(self.bundle, messages, images, self.settings, streamer=streamer,
                          stopping_criteria=[loop])
        self.stopped_looping = loop.stopped
        if self._conversation is conversation:
            self.history += messages[-1:] + [{"role": "assistant", "content": answer}]
            self.asked = len(images)  # images attached while it answered stay pending
        return answer
