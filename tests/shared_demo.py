"""The whole demo (`scripts/demo.sh`, as `make demo` runs it), once per test session, for every
pytest-xdist worker that asks: the first to ask starts it in the background, and each test
waits only for what it reads (a step marker of demo.sh's log, or its end). The demo is `make
test`'s longest chain: the self-cognition SFT on its LM lives in its own file, which the other
worker takes once the LM is trained, and the dpo stage on its stage 2 starts beside the demo's
last step (test_demo.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "VIRTUAL_ENV": sys.prefix,
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
# demo.sh's step markers, printed when the step before has finished
LM_READY = "== 3/7"  # the LM exported to OUT/lm
STAGE2_SCORED = "== 7/7"  # stage 2 trained (OUT/finetune) and its held-out exact match written


class SharedDemo:
    """scripts/demo.sh into `root`/out: its output in demo.log, its exit status in demo.rc."""

    def __init__(self, root: Path) -> None:
        self.root, self.out = root, root / "out"
        self.log, self.rc = root / "demo.log", root / "demo.rc"
        # InternLM2 -> Llama conversions (locked: two processes may convert at once)
        self.env = {**ENV, "LLAVA_TUNE_CACHE": str(root / "cache")}

    def start(self) -> subprocess.Popen | None:
        """Start the demo unless a worker did; the process when this call started it."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.root / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return None
        script = ('bash "$1/scripts/demo.sh" "$2" > "$3" 2>&1; echo $? > "$4.part"; '
                  'mv "$4.part" "$4"')
        return subprocess.Popen(["bash", "-c", script, "demo", str(REPO), str(self.out),
                                 str(self.log), str(self.rc)], env=self.env, cwd=self.root,
                                start_new_session=True)

    def wait(self, until: str | None = None, timeout: float = 3600) -> Path:
        """The demo's folder once it finished, or once its log shows the step marker `until`
        (LM_READY, STAGE2_SCORED); fails the test with the log's end when the demo failed or
        took too long."""
        deadline = time.monotonic() + timeout
        while True:
            if self.rc.exists():
                code = int(self.rc.read_text())
                if code:
                    pytest.fail(f"scripts/demo.sh exited {code}; the end of {self.log}:\n"
                                + self._tail())
                return self.out
            if until and self.log.exists() and until in self.log.read_text():
                return self.out
            if time.monotonic() > deadline:
                pytest.fail(f"scripts/demo.sh still running after {timeout:.0f} s; the end of "
                            f"{self.log}:\n" + self._tail())
            time.sleep(2)

    def _tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-40:]) if self.log.exists() else ""


def stop(process: subprocess.Popen, started: float, limit: float = 3600) -> None:
    """End a demo this process started (at time.monotonic() `started`) and nobody waited out:
    under xdist another worker may still wait for it, so it runs to its end, but no longer
    than `limit` seconds from its start; alone, it is stopped now."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            process.wait(timeout=max(0.0, started + limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
