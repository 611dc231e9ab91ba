"""Benchmark the prediction service the way it is deployed: a bundle served by `itp-serve`.

Measures start-up to /ready, /v1/predict latency for one patient and for a batch, the
service's peak RSS, and an in-process split of the per-patient cost (request parsing,
pipeline transform, SHAP, warnings) to show where the time goes. Everything it needs is
created in a temporary directory: a simulated cohort, a SQLite MLflow store, a registered
and exported model. Requests go to 127.0.0.1 only, in bounded loops.

    .venv/bin/python bench/bench_service.py            # or: make bench
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from environment import environment

BIN = Path(sys.executable).parent
MODEL = "itp-response"
PACKAGES = ("scikit-learn", "xgboost-cpu", "shap", "numpy", "pandas", "mlflow", "fastapi",
            "uvicorn", "pydantic")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status_kib(pid: int, key: str) -> int:
    """VmHWM (peak RSS) or VmRSS of a live process, in KiB, from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def prepare(workdir: Path, n_patients: int, seed: int, families: str, repeats: int,
            bootstrap: int) -> tuple[Path, Path, str]:
    """Simulate a cohort, train and register a model with the CLI, export the bundle."""
    from training.simulate import SCENARIOS, simulate, write_cohort

    data = workdir / "data" / "demo"
    write_cohort(simulate(n_patients, seed, SCENARIOS["default"]), data)
    bundle = workdir / "models" / MODEL
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    command = [str(BIN / "itp-train"), "train", "--data", str(data), "--experiment", MODEL,
               "--register", MODEL, "--alias", "champion", "--families", families,
               "--permutations", "0", "--repeats", str(repeats), "--bootstrap", str(bootstrap),
               "--export", str(bundle)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        sys.exit(f"training failed:\n{done.stderr[-3000:]}")
    chosen = "{family} ({feature_set})".format(**json.loads(done.stdout)["chosen"])
    print(f"trained {chosen} on {n_patients} patients in {time.perf_counter() - started:.0f}s",
          file=sys.stderr)
    return data, bundle, chosen


def patients_from_cohort(data: Path, n: int) -> list[dict[str, Any]]:
    """The first n episodes of the cohort as API patients, the way tests build them."""
    from service.payloads import patient_payloads
    from training.cohort import load_cohort

    cohort = load_cohort(data)
    return patient_payloads(cohort.metadata.iloc[:n], cohort.counts.iloc[:n])


def start_service(bundle: Path, workdir: Path, timeout: float = 120
                  ) -> tuple[subprocess.Popen[bytes], str, float]:
    """`itp-serve` on the bundle; returns (process, url, seconds from spawn to /ready 200)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"ITP_MODEL_URI": str(bundle), "ITP_HOST": "127.0.0.1", "ITP_PORT": str(port),
            "ITP_LOG_LEVEL": "warning", "MPLCONFIGDIR": str(workdir / "mpl")}
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"serve-{port}.log"
    started = time.perf_counter()
    with log.open("wb") as handle:
        process = subprocess.Popen([str(BIN / "itp-serve")], env=env, cwd=workdir,
                                   stdout=handle, stderr=subprocess.STDOUT)
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            sys.exit(f"service exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    stop(process)
    sys.exit(f"service not ready within {timeout}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def timed_requests(client: httpx.Client, url: str, bodies: list[dict[str, Any]]
                   ) -> list[float]:
    """Sequential POSTs, one per body; milliseconds each. Any non-200 aborts the benchmark."""
    times = []
    for body in bodies:
        started = time.perf_counter()
        response = client.post(f"{url}/v1/predict", json=body)
        times.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            sys.exit(f"/v1/predict answered {response.status_code}: {response.text[:500]}")
    return times


def median_ms(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of `action` in milliseconds, after one warm-up call."""
    action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def cost_split(bundle: Path, patients: list[dict[str, Any]], batch: int, repeats: int
               ) -> list[tuple[str, float, float]]:
    """Per-patient milliseconds of each stage, for 1 patient and for a batch, in-process."""
    from service.model import inputs, load_model
    from service.schemas import PredictRequest, PredictResponse
    from service.settings import Settings

    model = load_model(Settings(model_uri=str(bundle), tracking_uri=None))
    pipeline = model.explainer.pipeline
    shap_explainer = model.explainer._explainer  # shap's own object: SHAP alone, as called
    rows: list[tuple[str, float, float]] = []
    per_size: dict[int, dict[str, float]] = {}
    for size in (1, batch):
        body = {"patients": patients[:size], "explain": True, "top_k": 10}
        request = PredictRequest.model_validate(body)
        X = inputs(request.patients)
        aligned = pipeline.named_steps["align"].transform(X)
        transformed = pipeline[:-1].transform(X)
        predictions = model.predict(request.patients, True, 10, 0.5)
        response = PredictResponse(model=model.ref, threshold=model.threshold,
                                   predictions=predictions)
        stages: dict[str, Callable[[], object]] = {
            "validate request (pydantic)": lambda b=body: PredictRequest.model_validate(b),
            "request -> raw frame (model_input)": lambda r=request: inputs(r.patients),
            "pipeline: align taxa to genus": lambda x=X: pipeline.named_steps["align"]
            .transform(x),
            "pipeline: features (closure, filter, CLR, diversity, clinical)":
                lambda a=aligned: pipeline.named_steps["features"].transform(a),
            "SHAP values (explainer only)": lambda t=transformed: shap_explainer(t),
            "unknown-taxa check": lambda r=request: [
                pipeline.named_steps["align"].unknown_taxa(p.microbiome.counts)
                for p in r.patients],
            "LoadedModel.predict (frame, transform, SHAP, unknown taxa, warnings)":
                lambda r=request: model.predict(r.patients, True, 10, 0.5),
            "serialise response (pydantic)": lambda r=response: r.model_dump_json(),
        }
        per_size[size] = {name: median_ms(action, repeats) / size
                          for name, action in stages.items()}
    for name in per_size[1]:
        rows.append((name, per_size[1][name], per_size[batch][name]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400, help="simulated cohort size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--families", default="linear",
                        help="passed to itp-train; one name forces the served model family")
    parser.add_argument("--repeats", type=int, default=1,
                        help="CV repeats at training (not what is measured here)")
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200, help="single-patient requests")
    parser.add_argument("--batch", type=int, default=100, help="patients per batch request")
    parser.add_argument("--batch-requests", type=int, default=20)
    parser.add_argument("--startups", type=int, default=3, help="cold starts to time")
    parser.add_argument("--split-repeats", type=int, default=30,
                        help="repetitions per stage of the in-process cost split")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything here instead of a temporary directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="itp-bench-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        data, bundle, chosen = prepare(workdir, args.patients, args.seed, args.families,
                                       args.repeats, args.bootstrap)
        patients = patients_from_cohort(data, max(args.batch, 1))
        single = [{"patients": [patients[i % len(patients)]], "explain": True, "top_k": 10}
                  for i in range(args.requests)]
        batch = {"patients": patients[:args.batch], "explain": True, "top_k": 10}

        startups = []
        for _ in range(args.startups - 1):
            process, _, seconds = start_service(bundle, workdir)
            startups.append(seconds)
            stop(process)
        process, url, seconds = start_service(bundle, workdir)
        startups.append(seconds)
        try:
            rss_ready = proc_status_kib(process.pid, "VmRSS")
            with httpx.Client(timeout=120) as client:
                timed_requests(client, url, single[:5])  # warm-up
                one = timed_requests(client, url, single)
                many = timed_requests(client, url, [batch] * args.batch_requests)
            peak = proc_status_kib(process.pid, "VmHWM")
        finally:
            stop(process)
        split = cost_split(bundle, patients, args.batch, args.split_repeats)

    print(f"\nService benchmark ({chosen} model, {args.patients}-patient simulated cohort)\n")
    print(f"Environment: {environment(PACKAGES)}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| start-up to /ready (median of {len(startups)}; all: "
          f"{', '.join(f'{s:.2f}' for s in startups)} s) | {statistics.median(startups):.2f} s |")
    print(f"| 1 patient, explain, top_k=10: p50 / p95 ({len(one)} requests) | "
          f"{percentile(one, 50):.1f} / {percentile(one, 95):.1f} ms |")
    print(f"| {args.batch} patients, explain, top_k=10: p50 / p95 ({len(many)} requests) | "
          f"{percentile(many, 50):.0f} / {percentile(many, 95):.0f} ms "
          f"({percentile(many, 50) / args.batch:.2f} ms per patient) |")
    print(f"| RSS when ready | {rss_ready / 1024:.0f} MiB |")
    print(f"| peak RSS (VmHWM) after all requests | {peak / 1024:.0f} MiB |")
    print(f"\nIn-process cost per patient (median of {args.split_repeats}, ms)\n")
    print(f"| stage | 1 patient | batch of {args.batch} (per patient) |")
    print("|---|---|---|")
    for name, alone, batched in split:
        print(f"| {name} | {alone:.2f} | {batched:.3f} |")


if __name__ == "__main__":
    main()
