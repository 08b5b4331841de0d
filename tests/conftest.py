"""Shared fixtures: tiny models and data written by the tests themselves (no network), and
the tiny LM's tokenizers. Plain helpers (run_cli, the SMALL overrides) are in helpers.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from helpers import LOGGED, fixture_overrides, overrides_in
from shared_demo import SharedDemo, stop

from llava_tune.assembly.llm import load_tokenizer
from llava_tune.cli import main
from llava_tune.data.template import add_image_token
from llava_tune.demo import make as make_demo
from llava_tune.demo import shapes

REPO = Path(__file__).resolve().parents[1]

TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2}
TINY_VISION = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
}


FIRST = "test_demo.py"  # the demo's file: it starts the demo, and its worker waits for it


def pytest_collection_modifyitems(config, items):
    """Longest first: the demo's file, then the other files with slow tests, then the rest
    (stable, so each file keeps its order). `make test` runs two workers, a file each at a
    time; the demo (and its dpo stage, which test_demo.py runs beside the demo's last step) is
    most of one worker's run, so it must start first; the other worker runs the rest."""
    items.sort(key=lambda item: (item.path.name != FIRST,
                                 item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session")
def shared_demo(tmp_path_factory):
    """scripts/demo.sh, started by the first worker to ask (tests/shared_demo.py)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    demo = SharedDemo(root / "demo")
    started, process = time.monotonic(), demo.start()
    yield demo
    if process is not None:
        stop(process, started)


@pytest.fixture(autouse=True)
def _conversion_cache(tmp_path_factory, monkeypatch):
    """InternLM2 -> Llama conversions go to a per-session temp cache, not ~/.cache."""
    monkeypatch.setenv("LLAVA_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """The same cache for a module's own module-scoped fixtures (the autouse one above is
    function-scoped)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """SHAPES.md data: 64 train / 8 held-out images at 32 px, plus the text corpus."""
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(out, n_train=64, n_heldout=8, seed=0, image_size=32, n_text=200)
    return out


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, shapes_data) -> Path:
    """A random 2-layer InternLM2-layout checkpoint with the demo's byte-fallback tokenizer."""
    out = tmp_path_factory.mktemp("lm") / "tiny-internlm2"
    make_demo.make_lm(out, [shapes_data / "text.json"], seed=0, shape=TINY_LM)
    return out


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, weights) of a random 3-block ViT on 32 px images: 4 patches of width 64."""
    return make_demo.make_vision(tmp_path_factory.mktemp("vision"), seed=0,
                                 config=TINY_VISION, name="tiny-vit")


@pytest.fixture
def stage_overrides(tiny_lm, tiny_vision, shapes_data, tmp_path):
    """key=value overrides that point a demo config at the tiny fixtures."""
    return overrides_in(tmp_path, tiny_lm, tiny_vision, shapes_data)


@pytest.fixture(scope="session")
def tiny_finetune_run(tmp_path_factory, tiny_lm, tiny_vision, shapes_data) -> Path:
    """A finished stage-2 run as configs/demo/finetune.yaml trains it (projector + LoRA on the
    4-bit tiny LM; 2 steps, no stage 1), for the tests that load a run: chat, web, eval.
    Shared by them, so read-only: a test that changes a run works on a copy."""
    run = tmp_path_factory.mktemp("tiny-finetune") / "finetune"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAVA_TUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert main(["train", str(REPO / "configs" / "demo" / "finetune.yaml"),
                     *fixture_overrides("finetune", tiny_lm, tiny_vision, shapes_data, run),
                     "init_from=null", *LOGGED, "data.max_length=128",  # the last value wins
                     "train.max_steps=2"]) == 0
    return run


# --------------------------------------------------------------------------- tokenizers
# Built once from the session's tiny LM and shared, so read-only: a test that adds tokens
# loads its own.


@pytest.fixture(scope="session")
def sp(tiny_lm) -> spm.SentencePieceProcessor:
    """sentencepiece itself on the tiny LM's tokenizer.model: the expected ids."""
    return spm.SentencePieceProcessor(model_file=str(tiny_lm / "tokenizer.model"))


@pytest.fixture(scope="session")
def tok(tiny_lm):
    """The tiny LM's tokenizer, as text-only stages have it."""
    return load_tokenizer(tiny_lm)


@pytest.fixture(scope="session")
def image_tok(tiny_lm):
    """The tiny LM's tokenizer with <image> added, as stages with a vision tower have it."""
    tokenizer = load_tokenizer(tiny_lm)
    add_image_token(tokenizer)
    return tokenizer
