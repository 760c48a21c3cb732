"""One background thread that drives the engine: requests submitted from any thread join the running batch
between decoding steps (continuous batching); the thread sleeps when there is nothing to do."""

from __future__ import annotations

import threading
from typing import Any

from slimtune.serve.engine import Engine, Request


class Scheduler:
    """Runs ``Engine(model, max_batch).step()`` in a daemon thread while any request is queued or running."""

    def __init__(self, model: Any, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"--max-batch={max_batch}: must be at least 1")
        self.engine = Engine(model, max_batch)
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="slimtune-serve-engine", daemon=True)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        """Queue ``request`` (ValueError for a prompt the engine cannot run); it joins at the next step."""
        self.engine.add(request)
        self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            if self.engine.busy:
                self.engine.step()
            else:
                self.wake.wait(0.05)  # add() appends before set(), so busy is seen on the next pass
                self.wake.clear()
