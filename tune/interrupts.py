"""Stop signals: Ctrl-C (SIGINT) and SIGTERM (what ``timeout``, ``kill`` and cluster schedulers
send) end a search the same way, at any point (docs/search.md, "Stopping and resuming").

While Ray Tune's loop runs, the first signal asks Tune to stop: it ends its trials and saves the
experiment state one last time, so ``--resume`` continues where it stopped. Anywhere else, or on
a second signal, `Interrupted` is raised at once. Either way the driver then closes what it
opened (MLflow runs, Ray) and the CLI exits with 128 + the signal number. Tune's own SIGINT
handler is switched off: it knows neither SIGTERM nor how to tell the driver it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived. A `KeyboardInterrupt`, so that code catching ``Exception``
    (libraries retrying on errors) lets it through as it lets Ctrl-C through."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # the stop signals seen by this process, in order
_in_tune_loop = False


def received() -> int | None:
    """The first stop signal this process received, if any."""
    return _received[0] if _received else None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    tune_stop = signal.getsignal(signal.SIGUSR1) if _in_tune_loop else None
    if len(_received) == 1 and callable(tune_stop):
        tune_stop(signum, frame)  # Tune's graceful stop: its loop ends after this step
        return
    raise Interrupted(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM in this (main) thread from now on. Call it again after
    ``ray.init``: Ray's core worker replaces the SIGTERM handler with one that aborts."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


@contextlib.contextmanager
def sheltered() -> Iterator[None]:
    """Around ``ray.init``: the processes it starts (GCS, raylet, their workers) inherit a
    mask that blocks both signals, so a stop signal sent to the whole process group (Ctrl-C,
    ``timeout``, a cluster scheduler) reaches only the driver, which stops them in order; Ray
    itself shelters them from SIGINT only. A signal that arrives meanwhile waits for the end of
    the block. ``ray.init`` also puts in its own SIGTERM handler: ours are put back, if
    `install` had put them there."""
    ours = signal.getsignal(signal.SIGINT) is _on_signal
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        if ours:
            install()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


TUNE_SAYS = ("Stop signal received", "Experiment has been interrupted",
             "Trials did not complete")


def _said_by_us(record: logging.LogRecord) -> bool:
    """Tune's lines about a stop (and its resume hint, `Tuner.restore`, which is not how a
    search resumes): the driver says what happened, and how to resume, in one line."""
    return not str(record.msg).startswith(TUNE_SAYS)


@contextlib.contextmanager
def tune_loop() -> Iterator[None]:
    """Around ``Tuner.fit``: a first stop signal stops Tune gracefully (Tune installs its stop
    handler for SIGUSR1 when its loop starts; we call it), and the block then raises
    `Interrupted`. Tune leaves its handler behind; this restores the previous one."""
    global _in_tune_loop
    before = signal.getsignal(signal.SIGUSR1)
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(_said_by_us)
    _in_tune_loop = True
    try:
        yield
    finally:
        _in_tune_loop = False
        signal.signal(signal.SIGUSR1, before)
        tune_log.removeFilter(_said_by_us)
    if (signum := received()) is not None:
        raise Interrupted(signum)
