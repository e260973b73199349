"""The run's logger: the console on every rank, the log file on rank 0 only.

On a terminal, the progress bar (:class:`xp.callback.ProgressBar`) redraws one line at the
bottom (:func:`draw_live_line`); whatever else xp writes there, the console handler's log
lines and :func:`say`'s, goes above it, as ``tqdm.write`` does: the bar's line is cleared,
the line written, and the bar drawn again below it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOGGER_NAME = "xp"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_logger(
    log_file: Path | None, *, rank: int = 0, level: int = logging.INFO
) -> logging.Logger:
    """Configure the ``xp`` logger for this run and return it.

    Rank 0 logs at ``level`` to stderr and to ``log_file``; the other ranks log warnings
    and errors to stderr only, so N ranks do not print N copies of every line.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    formatter = _Redacting(_FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}")
    console = _Console(sys.stderr)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # Append mode: torch.compile and resumed runs must never truncate what is there.
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(_Redacting(_FORMAT))
        logger.addHandler(file_handler)
    return logger


class _Console(logging.StreamHandler):
    """The console handler: its lines go above the progress bar's line, never onto it."""

    def emit(self, record: logging.LogRecord) -> None:
        with _LIVE.above(self.stream):
            super().emit(record)


class _LiveLine:
    """The one line kept redrawn in place at the bottom of a terminal (the progress bar).

    A line written to the same terminal while it is shown would land on its end, so
    writers of whole lines wrap their write in :meth:`above`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._stream: TextIO | None = None
        self._file: tuple[int, int] | None = None
        self._text = ""

    def draw(self, stream: TextIO, text: str) -> None:
        with self._lock:
            if stream is not self._stream:
                self._stream, self._file = stream, _file_of(stream)
            # A line longer than the terminal wraps, and \r then redraws only its last row.
            width = _columns(stream)
            self._text = text[: width - 1] if width else text
            stream.write(f"\r{self._text}\x1b[K")
            stream.flush()

    def end(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.write("\n")
                self._stream.flush()
            self._stream, self._file, self._text = None, None, ""

    @contextlib.contextmanager
    def above(self, stream: TextIO) -> Iterator[None]:
        """Around a write of whole lines to ``stream``: they go above the live line."""
        with self._lock:
            live = self._stream
            if live is None or not (
                stream is live or (self._file is not None and _file_of(stream) == self._file)
            ):
                yield
                return
            live.write("\r\x1b[K")
            live.flush()
            try:
                yield
            finally:
                stream.flush()
                live.write(f"{self._text}\x1b[K")
                live.flush()


def _file_of(stream: TextIO) -> tuple[int, int] | None:
    """What ``stream`` writes to (stdout and stderr on one terminal are the same)."""
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # a stream without a file (captured)
        return None
    return status.st_dev, status.st_ino


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to; 0 when unknown (not a terminal)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


_LIVE = _LiveLine()


def draw_live_line(text: str, stream: TextIO | None = None) -> None:
    """Show ``text`` as the line at the bottom of ``stream`` (stderr), replacing the last;
    xp's log lines and :func:`say` print above it until :func:`end_live_line`."""
    _LIVE.draw(stream or sys.stderr, text)


def end_live_line() -> None:
    """Leave the live line where it is (what follows starts below it); a no-op if none."""
    _LIVE.end()


class _Redacting(logging.Formatter):
    """No line of the log shows a URI's password or a secret environment value."""

    def format(self, record: logging.LogRecord) -> str:
        from xp.tracking import redact_secrets

        return redact_secrets(super().format(record))


def close_logger() -> None:
    """Flush and detach the handlers (so the log file is complete before it is uploaded)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        handler.flush()
        logger.removeHandler(handler)
        handler.close()


def say(line: str, *, file: TextIO | None = None) -> None:
    """Write ``line`` and its newline in one write, then flush.

    ``print`` writes the text and the newline separately, and under ``python -u`` (or
    PYTHONUNBUFFERED) each goes straight to the file: two ranks sharing one terminal or
    pipe then splice their lines together. One write of a line is not split.
    """
    from xp.tracking import redact_secrets  # nothing xp prints shows a password

    stream = sys.stdout if file is None else file
    with _LIVE.above(stream):
        stream.write(redact_secrets(line) + "\n")
        stream.flush()
