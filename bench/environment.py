"""What every benchmark prints beside its numbers: the machine, the code and the versions."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path


def git_commit() -> str:
    """HEAD of the checkout being measured, marked `+changes` when the tree is dirty."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" +changes" if dirty.strip() else "")


def environment(packages: tuple[str, ...]) -> str:
    """One line describing the machine and library versions the numbers belong to."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    commit = git_commit()
    return (f"{time.strftime('%Y-%m-%d')}; {os.cpu_count()} cores ({cpu}), load average "
            f"{load} at the end; commit {commit}; Python {platform.python_version()}; {versions}")
