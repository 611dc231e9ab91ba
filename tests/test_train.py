"""Training runs in-process against a temporary SQLite MLflow store: failures leave nothing
registered or half-written, and the null scenario scores as chance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from scipy.special import logit

from tests.conftest import MODEL, Trained, run_cli
from training import registry
from training import train as train_module
from training.evaluation import CVConfig, NestedResult
from training.simulate import SCENARIOS, simulate, write_cohort
from training.train import TrainConfig, train


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)  # MLflow puts run artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "cohort"
    write_cohort(simulate(120, 3, SCENARIOS["default"]), out)
    return out


QUICK = CVConfig(n_splits=3, n_repeats=1, n_bootstrap=100)
NO_PERMUTATIONS = {"permutations": 0}


def test_a_run_that_fails_before_registration_registers_nothing(
    store: str, small_cohort: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(train_module.registry, "log_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train(TrainConfig(data=small_cohort, experiment="failing", cv=QUICK, **NO_PERMUTATIONS))
    client = MlflowClient(store)
    assert client.search_registered_models() == []
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id],
                                "tags.mlflow.parentRunId IS NULL")
    assert run.info.status == "FAILED"


def test_a_failed_alias_removes_the_new_version(
    store: str, small_cohort: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("no alias rights")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(PermissionError):
        train(TrainConfig(data=small_cohort, experiment="alias", cv=QUICK, **NO_PERMUTATIONS))
    client = MlflowClient(store)
    assert client.search_model_versions(f"name = '{MODEL}'") == []


def test_export_failure_keeps_the_previous_bundle_and_leaves_no_staging(
    store: str, small_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(TrainConfig(data=small_cohort, experiment="export", cv=QUICK, **NO_PERMUTATIONS))
    out = tmp_path / "models" / MODEL
    registry.export_bundle(f"models:/{MODEL}@champion", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    monkeypatch.setattr(registry, "digest", lambda directory: "0" * 64)
    with pytest.raises(registry.ModelIntegrityError):
        registry.export_bundle(f"models:/{MODEL}@champion", out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == [MODEL]


def test_a_bundle_without_a_recorded_digest_is_refused(
    trained: Trained, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in registry.DIGESTED_FILES:
        (bundle / name).write_bytes((trained.bundle / name).read_bytes())
    info = json.loads((trained.bundle / registry.BUNDLE_FILE).read_text())
    del info[registry.DIGEST_TAG]
    (bundle / registry.BUNDLE_FILE).write_text(json.dumps(info))
    with pytest.raises(registry.ModelIntegrityError, match="no recorded"):
        registry.load(str(bundle))
    with pytest.raises(registry.ModelIntegrityError, match="pinned"):
        registry.load(str(trained.bundle), expected_sha256="f" * 64)


def test_invalid_cohort_fails_cleanly_and_registers_nothing(
    store: str, small_cohort: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "feature-table.tsv").write_bytes((small_cohort / "feature-table.tsv").read_bytes())
    lines = (small_cohort / "metadata.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    row = lines[3].split("\t")
    row[header.index("treatment")] = "leeches"
    lines[3] = "\t".join(row)
    (broken / "metadata.tsv").write_text("\n".join(lines) + "\n")

    completed = run_cli("train", "--data", str(broken), cwd=tmp_path, check=False)
    assert completed.returncode == 2
    assert "metadata.tsv" in completed.stderr and "line 4" in completed.stderr
    assert "leeches" in completed.stderr and "Traceback" not in completed.stderr
    assert MlflowClient(store).search_registered_models() == []


def test_a_cohort_too_small_for_nested_cv_is_refused_with_the_numbers(
    store: str, tmp_path: Path
) -> None:
    data = tmp_path / "tiny"
    write_cohort(simulate(14, 2, SCENARIOS["default"]), data)
    completed = run_cli("train", "--data", str(data), "--register", MODEL, cwd=tmp_path,
                        check=False)
    assert completed.returncode == 2, completed.stderr
    message = re.search(r"only (\d+) patients among the (non-)?responders: need at least "
                        r"(\d+) for nested cross-validation with 5 outer and 3 inner folds",
                        completed.stderr)
    assert message and int(message[1]) < int(message[3]), completed.stderr
    assert "Traceback" not in completed.stderr
    assert MlflowClient(store).search_registered_models() == []


def test_null_scenario_scores_as_chance(store: str, tmp_path: Path) -> None:
    """No feature affects response: an honest pipeline must not find signal."""
    data = tmp_path / "null"
    write_cohort(simulate(300, 11, SCENARIOS["null"]), data)
    result = train(TrainConfig(data=data, experiment="null", register=None, alias=None,
                               cv=CVConfig(n_splits=5, n_repeats=1, n_bootstrap=300),
                               **NO_PERMUTATIONS))
    champion = result.summaries["champion"]
    assert champion["auroc_ci_low"] < 0.5 < champion["auroc_ci_high"], champion
    for name, summary in result.summaries.items():  # every feature set and family too
        assert abs(summary["auroc_mean"] - 0.5) < 0.08, (name, summary)
    assert result.registered_version is None
    # the user is told the microbiome added nothing, in the summary and on the run
    assert [w for w in result.warnings if "microbiome" in w], result.warnings
    tags = MlflowClient(store).get_run(result.run_id).data.tags
    assert tags["warnings"] == " | ".join(result.warnings)


def test_warnings_name_a_flat_model_and_a_microbiome_that_did_not_help() -> None:
    def nested(low: float) -> NestedResult:
        gain = {"auroc_difference": 0.02, "ci_low": low, "ci_high": 0.05}
        return NestedResult({}, [], {"combined-vs-clinical": gain})

    combined, clinical = {"feature_set": "combined"}, {"feature_set": "clinical"}
    assert train_module._warnings(False, combined, nested(0.01)) == []
    (flat,) = train_module._warnings(True, combined, nested(0.01))
    assert "no out-of-fold discrimination" in flat
    (unproven,) = train_module._warnings(False, combined, nested(-0.01))
    assert "not established" in unproven and "-0.010" in unproven
    (clinical_only,) = train_module._warnings(False, clinical, nested(0.01))
    assert "clinical and immune data only" in clinical_only


def test_an_xgboost_champion_serves_the_probabilities_of_its_pipeline(
    store: str, small_cohort: Path, tmp_path: Path
) -> None:
    """Through the service's own loading and prediction code (skops allow-list, SHAP)."""
    from service.model import load_model
    from service.schemas import Patient
    from service.settings import Settings
    from tests.test_e2e import patients_from_cohort

    train(TrainConfig(data=small_cohort, experiment="xgb", families=("xgboost",), cv=QUICK,
                      **NO_PERMUTATIONS))
    bundle = registry.export_bundle(f"models:/{MODEL}@champion", tmp_path / "bundle")
    served = load_model(Settings(model_uri=str(bundle)))
    assert type(served.stored.model.pipeline_[-1]).__name__ == "XGBClassifier"
    patients, frame = patients_from_cohort(small_cohort, 25)
    predictions = served.predict([Patient.model_validate(p) for p in patients], explain=True,
                                 top_k=5, threshold=served.threshold)
    expected = served.stored.model.predict_proba(frame)[:, 1]
    np.testing.assert_allclose([p.probability for p in predictions], expected, atol=1e-5)
    for prediction in predictions:
        explanation = prediction.explanation
        shown = sum(c.shap for c in explanation.contributions)
        total = explanation.base_value + shown + explanation.other_features.shap
        assert total == pytest.approx(float(logit(prediction.probability)), abs=1e-6)
