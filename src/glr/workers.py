"""Process pools whose workers end with their parent.

A `ProcessPoolExecutor` worker whose parent is killed (`kill -9`, the OOM killer, a node
going down under a scheduler) is adopted by another process and waits forever on its task
pipe. `process_pool` starts every worker with a watchdog thread that ends the worker as soon
as its parent is gone, whatever the start method (fork, forkserver or spawn).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

PARENT_CHECK_SECONDS = 0.5


def _watch_parent(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)  # no cleanup to run: the parent, which owns the results, is gone


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    # The process that started this worker (the pool's owner, or its forkserver, which exits
    # with it): when it is gone, getppid() returns the adopting process instead.
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent, PARENT_CHECK_SECONDS), daemon=True,
                     name="glr-parent-watchdog").start()
    if initializer is not None:
        initializer(*initargs)


def process_pool(workers: int, initializer: Callable | None = None,
                 initargs: tuple = ()) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor of `workers` processes that exit when this process dies."""
    return ProcessPoolExecutor(workers, initializer=_start_worker,
                               initargs=(initializer, initargs))
