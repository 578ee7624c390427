"""Signals during a run: a Ctrl-C or SIGTERM lands between permutations, never inside one."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT/SIGTERM until the block ends, then raise KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler not in (signal.SIG_IGN, None):
            signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler not in (signal.SIG_IGN, None):
                signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt
