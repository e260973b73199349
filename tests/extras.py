"""Tests that need an optional extra of xp skip, with the install command, where it is missing.

The README's test command (``pip install -e ".[test]" && python -m pytest``) must pass on
a machine with nothing else installed, so a test that needs DeepSpeed, say, skips there.
CI installs the extras too and runs those tests again with ``XP_TEST_ALL_EXTRAS=1``: then
a missing extra fails the test instead of skipping it, so an extra that CI forgot to
install cannot hide a test (see ``.ci/run``).
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from typing import NoReturn

import pytest

STRICT_ENV = "XP_TEST_ALL_EXTRAS"


def installed(module: str) -> bool:
    """Whether ``module`` imports here, without importing it (spawned ranks import it)."""
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


INSTALL = {"deepspeed": "DS_BUILD_OPS=0 pip install --no-build-isolation -e '.[deepspeed]'"}
"""Extras that install with more than ``pip install -e '.[extra]'`` (DeepSpeed builds
against the installed torch)."""


def requires_extra(module: str, extra: str) -> pytest.MarkDecorator:
    """Skip unless ``module`` is installed; the reason says how to install ``extra``."""
    missing = not installed(module) and os.environ.get(STRICT_ENV) != "1"
    command = INSTALL.get(extra, f"pip install -e '.[{extra}]'")
    return pytest.mark.skipif(missing, reason=f"needs the {extra} extra ({module}): {command}")


def missing_system(reason: str) -> NoReturn:
    """Skip for want of a system program (PostgreSQL, Chromium, Slurm, mpirun); under
    ``XP_TEST_ALL_EXTRAS=1`` fail instead: ``.ci/run`` installs them, so an install that
    broke cannot make the browser, cluster and server proofs vanish quietly."""
    if os.environ.get(STRICT_ENV) == "1":
        pytest.fail(f"{reason} [{STRICT_ENV}=1: CI must run this test]")
    pytest.skip(reason)
