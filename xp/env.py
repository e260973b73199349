"""What the run ran on: system facts collected once at start-up (mmengine's collect_env)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info(cwd: Path) -> dict[str, Any]:
    """Commit and dirtiness of the git tree the run was started in (empty outside git)."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd)
    if commit is None:
        return {}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
    return {"git_commit": commit, "git_dirty": bool(status)}


def _compiler() -> str | None:
    """The C++ compiler torch was built with, from its build configuration."""
    for line in torch.__config__.show().splitlines():
        line = line.strip()
        if line.startswith("- C++ Version") or line.startswith("- GCC") or "Compiler" in line:
            return line.lstrip("- ").strip()
    return None


def collect_system_env(cwd: Path | None = None) -> dict[str, Any]:
    """OS, Python, torch and its accelerators, library versions, git state."""
    env: dict[str, Any] = {
        "os": platform.platform(),
        "python": sys.version.replace("\n", " "),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_compiler": _compiler(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nvcc"] = _run(["nvcc", "--version"])
    for package in ("numpy", "hydra-core", "omegaconf", "mlflow", "scikit-learn", "deepspeed"):
        version = _version(package)
        if version is not None:
            env[package] = version
    env["xp"] = _version("xp")
    env.update(git_info(cwd or Path.cwd()))
    return env
