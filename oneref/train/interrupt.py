"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption).

The first signal asks for a stop: the step in flight finishes, the trainer writes a
checkpoint and raises :class:`TrainingInterrupted`, and ``--resume`` continues exactly from
there. A second signal stops at once (no checkpoint). Loader worker processes ignore both
(:func:`ignore_interrupts`), so that a Ctrl-C in the terminal or a scheduler's SIGTERM,
which reach the whole process group, do not kill them under a step that is still
finishing; such workers still alive when the process exits are killed then, since the
SIGTERM that multiprocessing stops them with at exit would leave it waiting for ever.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler before ours (atexit runs LIFO)
import signal
import threading

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal. ``what``: whether a checkpoint was written; ``resume``:
    the command that continues (the message joins them); ``signal_number``: the signal (the
    command exits with 128 + it, as a shell would report it)."""

    def __init__(self, what: str, signal_number: int = signal.SIGINT, resume: str = ""):
        super().__init__(f"{what}; continue with: {resume}" if resume else what)
        self.what, self.signal_number = what, int(signal_number)


class StopRequest:
    """While entered, SIGINT / SIGTERM set :attr:`signal_number` instead of stopping the
    process; a second signal raises :class:`TrainingInterrupted`. Outside the main thread
    (where Python cannot take signals) it does nothing."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signal_number).name if self.requested else None

    def _handle(self, number: int, frame) -> None:
        if self.requested:
            raise TrainingInterrupted(f"second {signal.Signals(number).name}: stopped at once, "
                                      "without a checkpoint", signal_number=number)
        self.signal_number = number
        log.warning("%s: the current step finishes and a checkpoint is written; send it again "
                    "to stop at once", self.signal_name)


def ignore_interrupts(worker_id: int) -> None:
    """``worker_init_fn`` of the training loaders: the main process handles SIGINT and
    SIGTERM, which a terminal or a scheduler sends to the whole process group."""
    for number in _SIGNALS:
        signal.signal(number, signal.SIG_IGN)


def _ignores_sigterm(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM (Linux: its ``SigIgn`` mask; else False)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next(line for line in status if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


@atexit.register
def _kill_workers_left() -> None:
    """Kill the loader workers of :func:`ignore_interrupts` still alive at exit (their loader
    kept by an uncaught exception's traceback, say): multiprocessing's own exit handler,
    which runs after this one, stops daemonic children with SIGTERM, which they ignore, and
    then waits for them for ever."""
    left = [child for child in multiprocessing.active_children()
            if child.daemon and child.pid is not None and _ignores_sigterm(child.pid)]
    if left and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report each killed worker as a second error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in left:
        child.kill()
