"""End to end, the user's way: CLI training into a SQLite MLflow store, the real service
started with uvicorn in a subprocess, called over HTTP."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from scipy.special import logit

from service.payloads import patient_payloads
from tests.conftest import BIN, MODEL, Server, Trained, run_cli, start_server, stop_server
from training import registry
from training.cohort import load_cohort
from training.features import model_input
from training.schema import CLINICAL_FIELDS
from training.train import candidate_name

pytestmark = pytest.mark.e2e

FAECALIBACTERIUM = ("d__Bacteria;p__Firmicutes;c__Clostridia;o__Oscillospirales;"
                    "f__Ruminococcaceae;g__Faecalibacterium")


def patients_from_cohort(data: Path, n: int) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The first n episodes of a cohort as API patients, and as the pipeline's raw frame."""
    cohort = load_cohort(data)
    metadata, counts = cohort.metadata.iloc[:n], cohort.counts.iloc[:n]
    return patient_payloads(metadata, counts), model_input(metadata, counts)


def predict(server: Server, patients: list[dict[str, Any]], **options: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/predict", json={"patients": patients, **options},
                      timeout=60)


# --- training, MLflow, registry -------------------------------------------------------------


def test_training_run_logs_params_metrics_plots_model_and_schema(trained: Trained) -> None:
    client = MlflowClient(trained.tracking_uri)
    run = client.get_run(trained.result["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["cv_auroc_ci_low"] <= metrics["cv_auroc_mean"] <= metrics["cv_auroc_ci_high"]
    for name in ("cv_auprc_mean", "cv_brier_mean", "cv_calibration_slope_mean"):
        assert name in metrics
    assert run.data.params["definition"] == "iwg"
    params = run.data.params  # episodes that cannot show a response are excluded, and counted
    assert int(params["n_episodes"]) + int(params["n_excluded_episodes"]) == trained.truth[
        "n_episodes"]
    assert int(params["n_patients"]) <= trained.truth["n_patients"]
    assert run.data.tags["data_fingerprint"] == load_cohort(trained.data).fingerprint
    assert run.data.tags["version.sklearn"]
    # what is served, stacked forest included, and its weight beside the chosen model's
    assert run.data.tags["served_model"] == candidate_name(trained.result["chosen"])
    assert metrics["stacked_forest_weight"] == pytest.approx(
        trained.result["chosen"]["stacked_forest_weight"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"roc_curve.png", "calibration_curve.png", "shap_summary.png", "feature_schema.json",
            "cv_predictions.tsv", "cohort_summary.json"} <= artifacts
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert {c.data.tags.get("set") for c in children} >= {"clinical", "microbiome", "combined"}
    assert all("cv_auroc_mean" in c.data.metrics for c in children)
    assert {"decision_curve.png", "pr_curve.png", "shap_stability.png", "model_comparison.png",
            "model_comparison.json", "outer_fold_choices.json", "inner_search.json"} <= artifacts
    for name in ("cv_calibration_slope_ci_low", "cv_calibration_in_the_large_mean",
                 "combined_vs_clinical_auroc_difference", "shap_rank_spearman",
                 "recalibration_slope", "decision_threshold"):
        assert name in metrics, name
    assert abs(metrics["control_permuted_auroc"] - 0.5) < 0.1


def test_champion_alias_points_at_a_version_whose_digest_matches_the_bundle(
    trained: Trained,
) -> None:
    client = MlflowClient(trained.tracking_uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == trained.result["run_id"]
    assert str(version.version) == trained.result["registered_version"]
    bundle = json.loads((trained.bundle / registry.BUNDLE_FILE).read_text())
    assert version.tags[registry.DIGEST_TAG] == bundle["sha256"] == trained.result["digest"]
    assert registry.digest(trained.bundle) == bundle["sha256"]


def test_logged_model_has_signature_and_loads_as_pyfunc_returning_probabilities(
    trained: Trained,
) -> None:
    mlflow.set_tracking_uri(trained.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{MODEL}@champion")
    assert info.signature is not None
    assert "baseline_platelets" in info.signature.inputs.input_names()
    _, frame = patients_from_cohort(trained.data, 5)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    probabilities = np.asarray(model.predict(frame))
    assert probabilities.shape[0] == 5
    assert np.all((probabilities >= 0) & (probabilities <= 1))


def test_every_registered_version_carries_its_model_card_and_its_dataset(
        trained: Trained, tmp_path: Path) -> None:
    """TRIPOD+AI card as run artifacts (Markdown, HTML) and as the version's description;
    the cohort logged as the run's training dataset with its fingerprint; reviewer tags."""
    client = MlflowClient(trained.tracking_uri)
    run = client.get_run(trained.result["run_id"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.md", "model_card.html"} <= artifacts
    version = client.get_model_version(MODEL, trained.result["registered_version"])
    card = version.description
    for section in ("Research use only", "## Intended use", "## Outcome", "Microbiome data",
                    "events per candidate parameter", "Calibration slope",
                    "Microbiome added value", "Net benefit", "Subgroups", "## Limitations"):
        assert section in card, section
    auroc = run.data.metrics["cv_auroc_mean"]
    assert f"AUROC {auroc:.3f}" in card
    assert "Research use only" in client.get_registered_model(MODEL).description
    html = Path(client.download_artifacts(run.info.run_id, "model_card.html", str(tmp_path)))
    assert "<table>" in html.read_text() and "<h1>" in html.read_text()
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.digest == load_cohort(trained.data).fingerprint[:20]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert run.data.tags["definition"] == "iwg"
    assert set(run.data.tags["treatments"].split(",")) >= {"corticosteroid", "ivig"}


def test_external_validation_on_an_independent_draw_is_logged_beside_the_version(
        trained: Trained) -> None:
    """`itp-train evaluate` on a cohort the model never saw: discrimination and calibration
    with CIs, subgroups, taxa match rate; an evaluation run linked to the model version."""
    run_cli("simulate", "--n-patients", "200", "--seed", "107", "--out", "data/external",
            cwd=trained.workdir, env=trained.env())
    completed = run_cli("evaluate", "--model", f"models:/{MODEL}@champion", "--data",
                        "data/external", "--bootstrap", "200", cwd=trained.workdir,
                        env=trained.env())
    result = json.loads(completed.stdout)
    summary = result["summary"]
    assert 0.6 < summary["auroc_mean"] < 0.9
    assert summary["calibration_slope_ci_low"] < summary["calibration_slope_mean"] < \
        summary["calibration_slope_ci_high"]
    assert "calibration_in_the_large_ci_low" in summary
    assert result["taxa_matched"]["median"] > 0.95  # same simulator: same taxonomy
    # labels derived with the response windows the model was trained with
    assert registry.load(str(trained.bundle)).metadata["windows"]["corticosteroid"] == [7, 30]
    variables = {row["variable"] for row in result["subgroups"]}
    assert variables == {"treatment", "sex", "age_band"}
    client = MlflowClient(trained.tracking_uri)
    run = client.get_run(result["run_id"])
    version = client.get_model_version(MODEL, trained.result["registered_version"])
    assert run.data.tags["registered_version"] == str(version.version)
    assert run.data.metrics["external_auroc_mean"] == pytest.approx(summary["auroc_mean"])
    assert {t.key: t.value for t in run.inputs.dataset_inputs[0].tags}[
        "mlflow.data.context"] == "evaluation"
    logged = client.get_logged_model(registry.logged_model_id(version))
    linked = {m.key: m.value for m in logged.metrics or []}
    assert linked["external_auroc_mean"] == pytest.approx(summary["auroc_mean"])


def test_validate_and_export_commands_of_the_readme(trained: Trained, tmp_path: Path) -> None:
    checked = run_cli("validate", "--data", str(trained.data), cwd=trained.workdir)
    assert "valid." in checked.stdout
    assert f"{trained.truth['n_episodes']} episodes" in checked.stdout
    out = tmp_path / "exported"
    run_cli("export", "--model", f"models:/{MODEL}@champion", "--out", str(out),
            cwd=trained.workdir, env=trained.env())
    bundle = json.loads((out / registry.BUNDLE_FILE).read_text())
    assert bundle["sha256"] == trained.result["digest"] == registry.digest(out)


# --- service over HTTP ----------------------------------------------------------------------


def test_health_ready_and_model_description(registry_server: Server, trained: Trained) -> None:
    assert httpx.get(f"{registry_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{registry_server.url}/ready").status_code == 200
    info = httpx.get(f"{registry_server.url}/v1/model").json()
    assert info["name"] == MODEL
    assert info["version"] == str(trained.result["registered_version"])
    assert info["run_id"] == trained.result["run_id"]
    chosen = trained.result["chosen"]
    assert info["trained_at"] and info["candidate"] == candidate_name(chosen)
    assert info["cv_metrics"]["auroc_mean"] == pytest.approx(
        trained.result["summaries"]["champion"]["auroc_mean"])
    assert info["recalibration"]["slope"] > 0 and 0 < info["threshold"] < 1
    assert info["recalibration"]["forest_slope"] == pytest.approx(
        chosen["stacked_forest_weight"])
    assert set(info["microbiome_added_value"]) == {"auroc_difference", "ci_low", "ci_high"}
    schema = info["feature_schema"]
    assert schema["rank"] in ("genus", "species")  # chosen in inner CV
    assert len(schema["taxa_vocabulary"]) >= 100
    assert schema["abundance"] == "counts" and schema["profile_source"] == "table"
    platelets = next(f for f in schema["clinical"] if f["name"] == "baseline_platelets")
    assert platelets["unit"] == "x10^9/L" and len(platelets["training_range"]) == 2


def test_one_patient_shap_sums_exactly_to_the_log_odds(
    registry_server: Server, trained: Trained
) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    response = predict(registry_server, patients, explain=True, top_k=10000)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": MODEL, "version": str(trained.result["registered_version"]),
                             "run_id": trained.result["run_id"], "alias": "champion"}
    (prediction,) = body["predictions"]
    explanation = prediction["explanation"]
    assert explanation["space"] == "log_odds"
    assert explanation["other_features"] == {"count": 0, "shap": 0.0}
    total = explanation["base_value"] + sum(c["shap"] for c in explanation["contributions"])
    assert total == pytest.approx(logit(prediction["probability"]), abs=1e-6)
    shaps = [abs(c["shap"]) for c in explanation["contributions"]]
    assert shaps == sorted(shaps, reverse=True)
    by_feature = {c["feature"]: c for c in explanation["contributions"]}
    assert not [f for f in by_feature if "|" in f or f.startswith("missingindicator_")]
    taxa = [c for f, c in by_feature.items() if f.startswith("d__")]
    rank = httpx.get(f"{registry_server.url}/v1/model").json()["feature_schema"]["rank"]
    assert taxa and all(c["unit"] == "CLR" and c["label"].endswith(f"({rank})") for c in taxa)
    assert all(0 <= c["relative_abundance_pct"] <= 100 for c in taxa)
    assert sum(c["relative_abundance_pct"] for c in taxa) <= 100 + 1e-6
    assert by_feature["baseline_platelets"]["unit"] == "x10^9/L"
    assert by_feature["baseline_platelets"]["label"] == "Baseline platelet count"
    assert by_feature["baseline_platelets"]["value"] == patients[0]["clinical"][
        "baseline_platelets"]


def test_top_k_lists_the_largest_and_sums_the_rest(registry_server: Server,
                                                   trained: Trained) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    full = predict(registry_server, patients, top_k=10000).json()["predictions"][0]
    top = predict(registry_server, patients, top_k=3).json()["predictions"][0]
    assert top["probability"] == full["probability"]
    listed = top["explanation"]["contributions"]
    assert [c["feature"] for c in listed] == [
        c["feature"] for c in full["explanation"]["contributions"][:3]]
    rest = top["explanation"]["other_features"]
    assert rest["count"] == len(full["explanation"]["contributions"]) - 3
    total = top["explanation"]["base_value"] + sum(c["shap"] for c in listed) + rest["shap"]
    assert total == pytest.approx(logit(top["probability"]), abs=1e-6)


def test_batch_predictions_equal_the_training_pipeline(bundle_server: Server,
                                                       trained: Trained) -> None:
    patients, frame = patients_from_cohort(trained.data, 40)
    response = predict(bundle_server, patients, explain=False)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["patient_id"] for p in predictions] == [p["patient_id"] for p in patients]
    assert all(p["explanation"] is None for p in predictions)
    model = registry.load(str(trained.bundle)).model
    expected = model.predict_proba(frame)[:, 1]
    served = np.array([p["probability"] for p in predictions])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    threshold = response.json()["threshold"]
    assert threshold == pytest.approx(model.threshold_)  # the model's own, chosen in training
    for p in predictions:
        assert p["label"] == ("responder" if p["probability"] >= threshold else "non-responder")


def test_unknown_taxa_are_reported_with_their_share_of_reads(
    bundle_server: Server, trained: Trained
) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    counts = patients[0]["microbiome"]["counts"]
    known = sum(counts.values())
    counts["k__Bacteria|p__Firmicutes|c__Bacilli|o__Lactobacillales|f__Lactobacillaceae|"
           "g__Notarealgenus|s__Notarealgenus_x"] = known  # half of all reads
    response = predict(bundle_server, patients, explain=True, top_k=10000)
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    unknown = [w for w in prediction["warnings"] if w["code"] == "unknown_taxa"]
    assert len(unknown) == 1
    assert "g__Notarealgenus" in unknown[0]["message"]
    assert "50.0%" in unknown[0]["message"]
    assert prediction["taxa_matched"] == pytest.approx(0.5)
    # shares are of all the reads the lab measured, the unknown half included
    shares = [c["relative_abundance_pct"] for c in prediction["explanation"]["contributions"]
              if c["relative_abundance_pct"] is not None]
    assert 0 < sum(shares) <= 50 + 1e-6


def test_relative_abundances_sent_to_a_count_model_are_flagged(
    bundle_server: Server, trained: Trained
) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    counts = patients[0]["microbiome"]["counts"]
    total = sum(counts.values())
    same = predict(bundle_server, patients).json()["predictions"][0]
    assert "abundance_kind" not in [w["code"] for w in same["warnings"]]
    patients[0]["microbiome"]["counts"] = {k: v / total for k, v in counts.items()}
    flagged = predict(bundle_server, patients).json()["predictions"][0]
    assert "abundance_kind" in [w["code"] for w in flagged["warnings"]]
    assert flagged["probability"] == pytest.approx(same["probability"], abs=1e-9)


@pytest.mark.parametrize("spelling", [
    "k__Bacteria|p__Firmicutes|c__Clostridia|o__Oscillospirales|f__Ruminococcaceae|"
    "g__Faecalibacterium|s__Faecalibacterium_prausnitzii",  # MetaPhlAn
    "d__Bacteria; p__Firmicutes_A; c__Clostridia; o__Oscillospirales; f__Ruminococcaceae; "
    "g__Faecalibacterium; s__Faecalibacterium prausnitzii",  # GTDB
    "D_0__Bacteria;D_1__Firmicutes;D_2__Clostridia;D_3__Clostridiales;D_4__Ruminococcaceae;"
    "D_5__Faecalibacterium;D_6__Faecalibacterium prausnitzii",  # SILVA 132
])
def test_other_spellings_of_a_known_taxon_are_matched(
    bundle_server: Server, trained: Trained, spelling: str
) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    patients[0]["microbiome"]["counts"] = {spelling: 5000}
    response = predict(bundle_server, patients)
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert "unknown_taxa" not in [w["code"] for w in prediction["warnings"]]
    assert prediction["taxa_matched"] == 1.0


def _bad(patient: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = json.loads(json.dumps(patient))
    *parents, leaf = path.split(".")
    target = changed
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[leaf]
    else:
        target[leaf] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        ("treatment", "homeopathy", "treatment", "corticosteroid"),
        ("clinical.baseline_platelets", KeyError, "clinical.baseline_platelets", "required"),
        ("clinical.age_years", -4, "clinical.age_years", "greater than or equal"),
        ("clinical.age_years", "old", "clinical.age_years", "number"),
        ("clinical.sex", "unknown", "clinical.sex", "female"),
        ("clinical.ldh", 200, "clinical[#", "Extra inputs"),  # unknown keys by position
        ("clinical.bleeding_score", "S9M1O0", "clinical", "ITP-BAT"),
        ("microbiome.counts", {}, "microbiome.counts", "at least 1 item"),
        ("microbiome.counts", {FAECALIBACTERIUM: 0}, "microbiome.counts", "no reads"),
        ("microbiome.counts", {"Faecalibacterium": 10}, "microbiome.counts[#0]", "pattern"),
        ("microbiome.counts", {FAECALIBACTERIUM: -5}, "microbiome.counts[#0]",
         "greater than or equal to 0"),
    ],
)
def test_invalid_input_is_a_422_naming_patient_and_field(
    bundle_server: Server, trained: Trained, path: str, value: Any, field: str, words: str
) -> None:
    patients, _ = patients_from_cohort(trained.data, 2)
    patients[1] = _bad(patients[1], path, value)
    if path == "clinical.bleeding_score":
        patients[1]["clinical"]["bleeding_scale"] = "ITP-BAT"
    response = predict(bundle_server, patients)
    assert response.status_code == 422
    problems = response.json()["detail"]
    assert any(p["patient_index"] == 1 and p["patient_id"] == patients[1]["patient_id"]
               and p["field"].startswith(field) and words in p["message"]
               for p in problems), problems


def test_a_non_string_patient_id_is_a_422_not_a_server_error(
    bundle_server: Server, trained: Trained
) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    patients[0]["patient_id"] = 123
    patients[0]["clinical"]["age_years"] = -1
    response = predict(bundle_server, patients)
    assert response.status_code == 422, response.text
    fields = {(p["patient_index"], p["field"]) for p in response.json()["detail"]}
    assert {(0, "patient_id"), (0, "clinical.age_years")} <= fields


def test_duplicate_ids_and_empty_batches_are_rejected(bundle_server: Server,
                                                      trained: Trained) -> None:
    patients, _ = patients_from_cohort(trained.data, 1)
    duplicate = predict(bundle_server, patients * 2)
    assert duplicate.status_code == 422 and "unique" in duplicate.text
    assert predict(bundle_server, []).status_code == 422


def test_openapi_documents_fields_units_and_examples(bundle_server: Server) -> None:
    spec = httpx.get(f"{bundle_server.url}/openapi.json").json()
    clinical = spec["components"]["schemas"]["Clinical"]["properties"]
    platelets = clinical["baseline_platelets"]
    assert "x10^9/L" in platelets["description"] and platelets["examples"]
    assert set(clinical) == {f.name for f in CLINICAL_FIELDS}
    assert "/v1/predict" in spec["paths"]
    assert "422" in spec["paths"]["/v1/predict"]["post"]["responses"]


def test_service_never_logs_patient_ids_or_payloads(bundle_server: Server,
                                                    trained: Trained) -> None:
    patients, _ = patients_from_cohort(trained.data, 3)
    for patient in patients:
        patient["patient_id"] = f"secret-{patient['patient_id']}"
    assert predict(bundle_server, patients).status_code == 200
    bad = _bad(patients[0], "clinical.age_years", -1)
    assert predict(bundle_server, [bad]).status_code == 422
    log = bundle_server.output()
    assert "secret-" not in log
    assert "baseline_platelets" not in log


def test_reload_needs_the_admin_token(bundle_server: Server) -> None:
    url = f"{bundle_server.url}/v1/model/reload"
    missing, wrong = httpx.post(url), httpx.post(url, headers={"Authorization": "Bearer wrong"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.json() == wrong.json()  # never says which part was wrong
    response = httpx.post(url, headers={"Authorization": "Bearer test-token"}, timeout=60)
    assert response.status_code == 200 and response.json()["name"] == MODEL


def test_tampered_model_is_never_served_and_a_failed_reload_keeps_the_old_one(
    trained: Trained, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(trained.bundle, bundle)
    env = trained.env(ITP_MODEL_URI=str(bundle), ITP_ADMIN_TOKEN="t")
    server = start_server([str(BIN / "itp-serve")], env, cwd=tmp_path, log=tmp_path / "a.log")
    try:
        patients, _ = patients_from_cohort(trained.data, 1)
        before = predict(server, patients).json()["predictions"][0]["probability"]
        model_file = bundle / registry.MODEL_FILE
        model_file.write_bytes(model_file.read_bytes() + b"tampered")
        reload = httpx.post(f"{server.url}/v1/model/reload",
                            headers={"Authorization": "Bearer t"}, timeout=60)
        assert reload.status_code == 503 and "previous model still serving" in reload.text
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 200 and "digest" in ready.json()["last_reload_failure"][
            "error"]
        info = httpx.get(f"{server.url}/v1/model").json()
        assert "digest" in info["last_reload_failure"]["error"]
        after = predict(server, patients).json()["predictions"][0]["probability"]
        assert after == before
    finally:
        stop_server(server)

    fresh = start_server([str(BIN / "itp-serve")], env, cwd=tmp_path, log=tmp_path / "b.log",
                         expect_ready=False)
    try:
        ready = httpx.get(f"{fresh.url}/ready")
        for _ in range(50):  # the first attempt runs in the background
            if (ready := httpx.get(f"{fresh.url}/ready")).json()["last_failure"]:
                break
            time.sleep(0.1)
        assert ready.status_code == 503 and "digest" in ready.json()["reason"]
        assert predict(fresh, patients).status_code == 503
    finally:
        stop_server(fresh)


def test_two_workers_serve_the_same_model(trained: Trained, tmp_path: Path) -> None:
    """ITP_WORKERS=2: uvicorn worker processes, each building the app from the environment;
    /v1/model never discloses where the bundle lies."""
    env = trained.env(ITP_MODEL_URI=str(trained.bundle), ITP_WORKERS="2")
    env.pop("MLFLOW_TRACKING_URI")
    server = start_server([str(BIN / "itp-serve")], env, cwd=tmp_path, log=tmp_path / "w.log")
    try:
        patients, frame = patients_from_cohort(trained.data, 5)
        expected = registry.load(str(trained.bundle)).model.predict_proba(frame)[:, 1]
        for _ in range(6):  # requests land on either worker
            served = [p["probability"] for p in predict(server, patients).json()["predictions"]]
            np.testing.assert_allclose(served, expected, atol=1e-9)
        info = httpx.get(f"{server.url}/v1/model").json()
        assert "source" not in info and str(trained.bundle) not in json.dumps(info)
        # /metrics adds up both workers' samples, whichever answers the scrape
        for _ in range(3):
            scraped = httpx.get(f"{server.url}/metrics").text
            line = next(row for row in scraped.splitlines()
                        if row.startswith("itp_patients_scored_total "))
            assert float(line.split()[1]) == 6 * len(patients)
    finally:
        stop_server(server)
