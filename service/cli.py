"""`itp-serve`: run the prediction service with uvicorn, configured from the environment."""

from __future__ import annotations

import math
import os
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path = CGROUP) -> int:
    """CPUs this process may use: its affinity, capped by a container's CPU quota (cgroup v2
    `cpu.max`, v1 `cpu.cfs_quota_us`), which `os.cpu_count()` ignores: a pod limited to one
    CPU on a 64-core node would otherwise run 64 BLAS threads and be throttled. (joblib's
    `cpu_count` does the same, but importing it loads numpy before the thread variables
    are set.)"""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    for quota_file, period_file in (("cpu.max", None),
                                    ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (cgroup / quota_file).read_text().split()
            if period_file is not None:
                fields.append((cgroup / period_file).read_text().strip())
            quota, period = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):  # absent, "max" (no limit), unreadable
            continue
        if quota > 0 and period > 0:
            return max(1, min(cpus, math.ceil(quota / period)))
    return max(1, cpus)


def main() -> None:
    from service.settings import Settings

    settings = Settings()
    # Each worker gets its share of the cores for BLAS/OpenMP, set before numpy loads them,
    # so N workers never run N x cores threads.
    threads = max(1, available_cpus() // settings.workers)
    for variable in THREAD_VARIABLES:
        os.environ.setdefault(variable, str(threads))

    # No usage reports leave a machine that holds patient data unless asked for (Dockerfile)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # each worker writes its metrics here; /metrics adds them up (service/metrics.py)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="itp-metrics-")

    import uvicorn

    from service import logs

    logs.configure(settings.log_level, settings.log_format)  # this process (workers: the parent)
    # On SIGTERM uvicorn stops accepting, lets requests in flight finish (for up to
    # ITP_SHUTDOWN_GRACE_SECONDS), runs the lifespan shutdown (the model threads stop), then
    # raises the signal again to die by it; our handler turns that into exit status 0, which
    # is what a drained stop is. (Before uvicorn runs, the same handler just exits 0.)
    signal.signal(signal.SIGTERM, _drained)
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "log_config": logs.uvicorn_config(settings.log_level, settings.log_format),
        "access_log": False,  # service.logs.AccessLog writes the one access record
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
    }
    if settings.workers > 1:  # worker processes import the app built from the environment
        uvicorn.run("service.app:app", workers=settings.workers, **options)
    else:
        from service.app import create_app

        uvicorn.run(create_app(settings), **options)


def _drained(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside uvicorn's own handler: before it serves, or raised again by it once
    it has drained. Either way the stop is clean."""
    raise SystemExit(0)


if __name__ == "__main__":
    main()
