"""Using llava-tune from Python prints no misleading library notices (the CLI's own quieting
is in cli/__init__.py), and real warnings still show."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import llava_tune

REPO = Path(__file__).resolve().parents[1]


def test_load_run_import_prints_no_kernel_hub_notice():
    """`llava_tune.load_run` imports peft, which imports bitsandbytes; on CPUs with AVX512-BF16
    bitsandbytes then warns that it could not fetch a kernel from a hub."""
    result = subprocess.run([sys.executable, "-c", "import llava_tune; llava_tune.load_run"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr
    assert "trust_remote_code" not in result.stderr


def test_only_that_notice_is_dropped(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    # The logger's own level too: an in-process CLI run before this test quiets it on purpose.
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(llava_tune.KERNEL_HUB_NOTICE + ": %s. Please make sure ...", "untrusted")
        logger.warning("a real problem")
        logger.error("a real error")
    assert [r.getMessage() for r in caplog.records] == ["a real problem", "a real error"]
