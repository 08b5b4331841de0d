"""Every file llava-tune writes has the permissions the user's umask gives a plain file:
0644 under umask 022, never the 0600 of a temp file or of safetensors' save_file."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from llava_tune.cli import main
from llava_tune.demo.make import make_vision
from llava_tune.files import atomic_dir, current_umask, write_bytes_atomic

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Relative path -> octal permission bits of `root` and everything under it."""
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.stat().st_mode))
    return found


def test_current_umask_reads_without_changing_it():
    with umask(0o027):
        assert current_umask() == 0o027
        assert current_umask() == 0o027


def test_atomic_writes_follow_the_umask(tmp_path):
    with umask(0o027):
        write_bytes_atomic(tmp_path / "a.bin", b"x")
        with atomic_dir(tmp_path / "folder") as tmp:
            save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # created 0600
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "sub" / "run.sh").chmod(0o700)
    assert oct(stat.S_IMODE((tmp_path / "a.bin").stat().st_mode)) == "0o640"
    assert modes(tmp_path / "folder") == {".": "0o750", "model.safetensors": "0o640",
                                          "sub": "0o750", "sub/run.sh": "0o750"}


def test_train_and_export_write_0644_under_umask_022(stage_overrides, tmp_path):
    with umask(0o022):
        vision = make_vision(tmp_path / "vision", seed=0, name="perm-vit", config={
            "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                            "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1,
                         "layers": 1}})
        assert main(["train", str(REPO / "configs/demo/finetune.yaml"),
                     *stage_overrides("finetune"), "init_from=null", "train.max_steps=2",
                     "train.batch_size=4", "data.max_length=64", "train.save_every=1",
                     "train.vision=lora", "train.vision_lora.r=2"]) == 0
        for fmt in ("llm", "internlm2", "hf-llava", "xtuner"):
            assert main(["export", str(tmp_path / "run"), str(tmp_path / fmt), "--format",
                         fmt]) == 0
    written = {"vision": modes(tmp_path / "vision"), "run": modes(tmp_path / "run")}
    written.update({fmt: modes(tmp_path / fmt) for fmt in ("llm", "internlm2", "hf-llava",
                                                           "xtuner")})
    assert "checkpoints/step-0000002/trainable.safetensors" in written["run"]
    assert "vision_adapter/adapter_model.safetensors" in written["run"]
    assert str(vision[1].name) in written["vision"]
    wrong = {f"{where}/{name}": mode for where, found in written.items()
             for name, mode in found.items()
             if mode != ("0o755" if (tmp_path / where / name).is_dir() else "0o644")}
    assert wrong == {}
