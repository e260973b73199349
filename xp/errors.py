"""How a run's command ends when something went wrong: one line for what a user can fix."""

from __future__ import annotations

import os
import sys

from xp.checkpoint import CheckpointError
from xp.log import say
from xp.tracking import TrackingError

USER_ERRORS = (ValueError, TypeError, CheckpointError, TrackingError)
"""Errors a user causes with config or input: reported as one message, no traceback."""
INCOMPLETE_RECORD_EXIT = 3
"""The exit status of a run that trained to its end while MLflow's record of it stayed
incomplete (the store or the writer failed): ``resume=<run id>`` completes it."""


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a config or input error, told in one ``xp: error:`` line by
    :func:`exit_on_user_error`."""
    return isinstance(error, USER_ERRORS) and not os.environ.get("HYDRA_FULL_ERROR")


def exit_on_user_error(error: BaseException) -> None:
    """A config or input error is one ``xp: error:`` line and exit status 1, no traceback
    (``HYDRA_FULL_ERROR=1`` shows it)."""
    if is_user_error(error):
        say(f"xp: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def innermost_message(error: BaseException) -> str:
    """The innermost error's message (an ImportError under Hydra's wrapper, say)."""
    inner = error
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = str(inner).strip().splitlines() or [type(inner).__name__]
    return lines[-1] if inner is error else f"{type(inner).__name__}: {lines[-1]}"
