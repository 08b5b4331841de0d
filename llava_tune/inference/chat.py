"""A chat session with one model: history, image, system prompt. No I/O: the CLI reads and
prints, so the same session serves the terminal, pipes and tests."""

from __future__ import annotations

from pathlib import Path

from llava_tune.assembly.model import ModelBundle
from llava_tune.constants import IMAGE_TOKEN
from llava_tune.data.image import load_image
from llava_tune.data.template import Message
from llava_tune.errors import UserError
from llava_tune.inference.generate import GenerationSettings, LoopStop, generate

NO_IMAGE_NOTE = "no image attached; answering from the text alone"
"""Said (by chat and the web page) when a model with a vision tower is asked without one."""
LOOP_NOTE = "answer stopped: it kept repeating itself"
"""Said when LoopStop ended an answer."""


class ChatSession:
    """Multi-turn conversation; the image (at most one) belongs to the first question."""

    def __init__(self, bundle: ModelBundle, system: str | None = None,
                 settings: GenerationSettings | None = None) -> None:
        self.bundle = bundle
        self.system = system
        self.settings = settings or GenerationSettings()
        self.image = None
        self.image_path: Path | None = None
        self.history: list[Message] = []
        self.stopped_looping = False
        """Whether the last answer was ended because it kept repeating itself."""

    @property
    def has_vision(self) -> bool:
        return self.bundle.model.vision is not None

    @property
    def image_note(self) -> str | None:
        """NO_IMAGE_NOTE when the model could see an image but has none; else None."""
        return NO_IMAGE_NOTE if self.has_vision and self.image is None else None

    def attach_image(self, path: str | Path) -> None:
        """Load an image for a new conversation (the old one ends)."""
        if not self.has_vision:
            raise UserError("this model has no vision tower; it chats about text only")
        self.image = load_image(path)
        self.image_path = Path(path)
        self.reset()

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt; empty text clears it (the run's default too)."""
        self.system = text or ""

    def messages_for(self, question: str) -> list[Message]:
        """The conversation so far plus `question`, as the template wants it."""
        # None: the template's default applies; "" overrides that default with none.
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        if self.image is not None and not self.history:
            question = f"{IMAGE_TOKEN}\n{question}"
        return messages + self.history + [{"role": "user", "content": question}]

    def ask(self, question: str, streamer=None) -> str:
        """Answer `question` in context; the turn joins the history only once answered, so
        an interrupted answer leaves the conversation as it was. An answer caught in a loop
        ends there (LoopStop; `stopped_looping` says so): a person is waiting for it."""
        messages = self.messages_for(question)
        images = [self.image] if self.image is not None else []
        loop = LoopStop()
        answer = generate(self.bundle, messages, images, self.settings, streamer=streamer,
                          stopping_criteria=[loop])
        self.stopped_looping = loop.stopped
        self.history += messages[-1:] + [{"role": "assistant", "content": answer}]
        return answer
