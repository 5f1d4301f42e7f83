"""Ctrl-C and SIGTERM during training: finish the step, save, stop."""
from __future__ import annotations

import signal
import threading


class Interrupts:
    """Inside `with`: the first SIGINT (Ctrl-C) or SIGTERM only sets `requested` (the loop
    finishes its step and saves); a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self, on_first):
        self.requested = False
        self.on_first = on_first
        self.old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.on_first()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False
