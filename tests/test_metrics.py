"""metrics.py: the peak memory a run logs is its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llava_tune.training.metrics import peak_rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_is_the_process_own_not_its_parents():
    """A process started by a big one (as bench_train.py starts both systems, or a notebook a
    trainer) inherits the parent's peak in getrusage's ru_maxrss; memory_mb must not."""
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: resident
    assert peak_rss_mb() > 600
    code = ("import resource; from llava_tune.training.metrics import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, inherited = map(float, out.stdout.split())
    del ballast
    assert own < 200, own
    assert inherited > 600, inherited  # the reason for not using ru_maxrss
