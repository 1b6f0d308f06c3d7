"""Pool workers end when their parent is killed (kill -9), instead of waiting forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from glr import workers

PARENT = """
import os, sys, time
from glr.workers import process_pool

def pid_after_a_while(_):
    time.sleep(0.5)  # long enough that both workers get one task
    return os.getpid()

if __name__ == "__main__":
    pool = process_pool(2)
    print(" ".join(str(p) for p in sorted(set(pool.map(pid_after_a_while, range(2))))),
          flush=True)
    time.sleep(600)  # the workers now wait idle on their task pipe
"""


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie that nobody reaps)."""
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines()
                     if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "zombie" not in state and "(dead)" not in state


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10 * workers.PARENT_CHECK_SECONDS + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "pool workers outlived their parent"
    finally:
        parent.kill()
        for pid in pids if "pids" in locals() else []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


_STATE: dict[str, str] = {}


def _remember(value: str) -> None:
    _STATE["init"] = value


def _recall(_: int) -> str:
    return _STATE.get("init", "missing")


def test_the_pool_runs_its_initializer_and_tasks():
    with workers.process_pool(2, initializer=_remember, initargs=("yes",)) as pool:
        assert list(pool.map(_recall, range(3))) == ["yes"] * 3
