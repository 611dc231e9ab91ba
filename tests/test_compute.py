"""Scale-out: the nested CV runs on a Dask cluster (a LocalCluster here) with the same
results as locally, and the CLI sends its fits there."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from training.cli import main
from training.cohort import load_cohort
from training.compute import dask_backend, progress
from training.evaluation import CVConfig, nested_cross_validate
from training.features import model_input
from training.outcomes import response_labels, target
from training.simulate import SCENARIOS, simulate, write_cohort
from training.tuning import ModelSearch

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster() -> object:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as local:
        yield local


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dask")
    write_cohort(simulate(120, 5, SCENARIOS["default"]), directory)
    return directory


def test_nested_cv_on_a_dask_cluster_equals_the_local_run(
        cluster: object, cohort_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    loaded = load_cohort(cohort_dir)
    X = model_input(loaded.metadata, loaded.counts)
    y = target(response_labels(loaded.metadata)).to_numpy()
    groups = loaded.groups.to_numpy()
    search = ModelSearch(ranks=("genus",), seed=1)
    config = CVConfig(n_splits=3, n_bootstrap=100, seed=1)
    local = nested_cross_validate(search, X, y, groups, config, regions=False)
    caplog.set_level(logging.INFO, logger="training.compute")
    with dask_backend(cluster.scheduler_address) as n_jobs, \
            distributed.get_task_stream() as tasks:
        assert n_jobs == -1
        remote = nested_cross_validate(search, X, y, groups, CVConfig(
            n_splits=3, n_bootstrap=100, seed=1, n_jobs=n_jobs), regions=False)
    assert len(tasks.data) >= 3  # the outer folds ran as tasks on the cluster
    done = [r.getMessage() for r in caplog.records if "outer folds done" in r.getMessage()]
    assert done[-1].startswith("nested CV: 3/3 outer folds done")  # progress from Dask too
    np.testing.assert_allclose(remote.champion.oof, local.champion.oof)


def test_the_cli_trains_on_the_cluster(cluster: object, cohort_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [
        "train", "--data", str(cohort_dir), "--register", "", "--splits", "3",
        "--permutations", "0", "--bootstrap", "100", "--rank", "genus", "--no-stack",
        "--dask-scheduler", cluster.scheduler_address,
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the summary; log lines go to stderr
    # --no-stack reached the search (a weight of 0 alone could be a forest the stack dropped)
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(summary["run_id"])
    assert run.data.params["stack"] == "False"
    assert summary["chosen"]["stacked_forest_weight"] == 0.0  # the model alone


def test_an_unreachable_scheduler_is_a_clear_error(cohort_dir: Path, tmp_path: Path) -> None:
    from training.compute import ComputeError

    with pytest.raises(ComputeError, match="cannot reach the Dask scheduler"), \
            dask_backend("tcp://127.0.0.1:9", timeout=2):
        pass


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_log_lines_elsewhere(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="training.compute")
    assert list(progress(iter("abcd"), 4, "nested CV")) == list("abcd")
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [
        f"nested CV: {i}/4 outer folds done" for i in range(1, 5)]
    assert all("ETA" in line for line in lines)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caplog.clear()
    assert list(progress(iter("abc"), 3, "permutation control")) == list("abc")
    assert "permutation control" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert not caplog.records
