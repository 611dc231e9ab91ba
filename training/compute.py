"""Where the fits run: local processes (joblib's loky) or a Dask cluster.

Every CV and tuning fit goes through joblib, so scaling out is a backend switch, not new
code: `--dask-scheduler tcp://host:8786` sends the outer folds to the cluster's workers
(which need this package installed). Each fit is single-threaded (`single_threaded_fit`);
parallelism comes from running folds side by side, so BLAS or OpenMP threads never multiply
with the workers and oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from joblib import parallel_config
from threadpoolctl import threadpool_limits
from tqdm import tqdm

T = TypeVar("T")

log = logging.getLogger(__name__)


class ComputeError(RuntimeError):
    """The compute backend cannot be used (not installed, scheduler unreachable)."""


@contextlib.contextmanager
def dask_backend(scheduler: str | None, timeout: float = 20.0) -> Iterator[int]:
    """Run joblib work on the Dask cluster at `scheduler`, reached within `timeout` seconds;
    yields the n_jobs to use (-1: all workers). Without a scheduler, a no-op that yields 0
    (keep the local n_jobs)."""
    if not scheduler:
        yield 0
        return
    try:
        from distributed import Client
    except ImportError:
        raise ComputeError("--dask-scheduler needs dask.distributed: pip install "
                           "'itp-response[dask]'") from None
    try:
        client = Client(scheduler, timeout=f"{timeout}s")
    except OSError as exc:
        raise ComputeError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
    with client:
        workers = len(client.scheduler_info().get("workers", {}))
        log.info("running fits on the Dask cluster at %s (%d workers, dashboard %s)",
                 scheduler, workers, client.dashboard_link)
        with parallel_config(backend="dask"):
            yield -1


@contextlib.contextmanager
def single_threaded_fit(parallel: bool) -> Iterator[None]:
    """One BLAS/OpenMP thread per fit when fits run side by side."""
    if not parallel:
        yield
        return
    with threadpool_limits(limits=1):
        yield


def progress(results: Iterable[T], total: int, what: str) -> Iterator[T]:
    """Outer folds done out of `total`, with elapsed time and ETA, as they come back from
    local processes or Dask workers alike: a bar on a terminal, log lines otherwise (CI
    logs, files), where a bar's carriage returns would be noise."""
    if sys.stderr.isatty():
        yield from tqdm(results, total=total, desc=what, unit="fold", file=sys.stderr)
        return
    started = time.monotonic()
    for done, result in enumerate(results, 1):
        elapsed = time.monotonic() - started
        log.info("%s: %d/%d outer folds done, %.0f s elapsed, ETA %.0f s", what, done, total,
                 elapsed, elapsed / done * (total - done))
        yield result
