"""The run's logger: the console on every rank, the log file on rank 0 only."""

from __future__ import annotations

import logging
import sys
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
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # Append mode: torch.compile and resumed runs must never truncate what is there.
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(_Redacting(_FORMAT))
        logger.addHandler(file_handler)
    return logger


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
    stream.write(redact_secrets(line) + "\n")
    stream.flush()
