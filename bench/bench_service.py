"""Benchmark the prediction service against `mlflow models serve` and the in-process floor.

In one run, on one registered model: our service (`itp-serve` on the exported bundle,
predict + exact SHAP explanation), `mlflow models serve` on the same registry version
(predict only, its pyfunc), and the in-process floor (`LoadedModel.predict` on validated
patients: scoring and explanation with no HTTP, JSON or validation). Each server gets the
same closed-loop load from a separate process (bench/load.py): 1 and 4 concurrent clients,
single patients and batches of 100 and 1,000. Reports req/s, patients/s, p50/p99 and the
ratios the targets are stated in, plus start-up to /ready. Everything is created in a
temporary directory (simulated cohort, SQLite store, registered and exported model);
requests go to 127.0.0.1 only.

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
    """n episodes of the cohort as API patients (cycled, ids kept unique)."""
    from service.payloads import patient_payloads
    from training.cohort import load_cohort

    cohort = load_cohort(data)
    base = patient_payloads(cohort.metadata, cohort.counts)
    return [{**base[i % len(base)], "patient_id": f"{base[i % len(base)]['patient_id']}-{i}"}
            for i in range(n)]


def mlflow_body(patients: list[dict[str, Any]]) -> dict[str, Any]:
    """The same patients as `mlflow models serve` takes them: the model's input frame."""
    from service.model import inputs
    from service.schemas import Patient

    frame = inputs([Patient.model_validate(p) for p in patients])
    frame = frame.astype(object).where(frame.notna(), None)
    return {"dataframe_split": {"columns": [str(c) for c in frame.columns],
                                "data": frame.to_numpy().tolist()}}


def start(command: list[str], env: dict[str, str], workdir: Path, url: str, probe: str,
          timeout: float = 180) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn a server; returns (process, seconds from spawn until `probe` answers 200)."""
    log = workdir / f"server-{url.rsplit(':', 1)[1]}.log"
    started = time.perf_counter()
    with log.open("wb") as handle:
        process = subprocess.Popen(command, env=env, cwd=workdir, stdout=handle,
                                   stderr=subprocess.STDOUT)
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            sys.exit(f"{command[0]} exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}{probe}", timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    stop(process)
    sys.exit(f"{command[0]} not ready within {timeout}s:\n{log.read_text()[-3000:]}")


def ours(bundle: Path, workdir: Path, workers: int) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"ITP_MODEL_URI": str(bundle), "ITP_HOST": "127.0.0.1", "ITP_PORT": str(port),
            "ITP_LOG_LEVEL": "warning", "ITP_WORKERS": str(workers)}
    url = f"http://127.0.0.1:{port}"
    process, seconds = start([str(BIN / "itp-serve")], env, workdir, url, "/ready")
    return process, f"{url}/v1/predict", seconds


def mlflow_serve(workdir: Path, workers: int) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it execs uvicorn
    url = f"http://127.0.0.1:{port}"
    process, seconds = start(
        [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
        env, workdir, url, "/ping")
    return process, f"{url}/invocations", seconds


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def drive(url: str, body: dict[str, Any], clients: int, seconds: float, workdir: Path
          ) -> dict[str, float]:
    """bench/load.py in its own process; req/s, p50, p99 (ms)."""
    path = workdir / "body.json"
    path.write_text(json.dumps(body))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("load.py")), "--url",
                           url, "--body", str(path), "--clients", str(clients), "--seconds",
                           str(seconds)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["errors"]:
        sys.exit(f"{url}: {result['errors']} requests failed")
    latencies = result["latencies_ms"]
    return {"rps": len(latencies) / result["seconds"], "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "n": len(latencies)}


def floor(bundle: Path, patients: list[dict[str, Any]], sizes: tuple[int, ...],
          seconds: float) -> dict[int, dict[str, float]]:
    """LoadedModel.predict in this process on validated patients: scoring, SHAP, warnings."""
    from service.model import load_model
    from service.schemas import Patient
    from service.settings import Settings

    model = load_model(Settings(model_uri=str(bundle), tracking_uri=None))
    result = {}
    for size in sizes:
        batch = [Patient.model_validate(p) for p in patients[:size]]
        model.predict(batch, True, 10, 0.5)
        times = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            model.predict(batch, True, 10, 0.5)
            times.append((time.perf_counter() - started) * 1000)
        result[size] = {"rps": 1000 / statistics.mean(times), "p50": percentile(times, 50),
                        "p99": percentile(times, 99), "n": len(times)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400, help="simulated cohort size")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--families", default="linear",
                        help="passed to itp-train; one name forces the served model family")
    parser.add_argument("--repeats", type=int, default=1,
                        help="CV repeats at training (not what is measured here)")
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=6.0, help="per load measurement")
    parser.add_argument("--workers", type=int, default=1, help="server workers, both servers")
    parser.add_argument("--startups", type=int, default=3, help="cold starts to time")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything here instead of a temporary directory")
    args = parser.parse_args()
    sizes = (1, 100, 1000)

    with tempfile.TemporaryDirectory(prefix="itp-bench-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        data, bundle, chosen = prepare(workdir, args.patients, args.seed, args.families,
                                       args.repeats, args.bootstrap)
        patients = patients_from_cohort(data, max(sizes))
        ours_bodies = {n: {"patients": patients[:n], "explain": True, "top_k": 10}
                       for n in sizes}
        mlflow_bodies = {n: mlflow_body(patients[:n]) for n in sizes}

        startups = []
        for _ in range(args.startups):
            process, _, seconds = ours(bundle, workdir, args.workers)
            startups.append(seconds)
            stop(process)
        rows: dict[tuple[str, int, int], dict[str, float]] = {}
        for name, launch, bodies in (("ours (predict + SHAP)", ours, ours_bodies),
                                     ("mlflow models serve (predict)", mlflow_serve,
                                      mlflow_bodies)):
            process, url, _ = (launch(bundle, workdir, args.workers) if launch is ours
                               else launch(workdir, args.workers))
            try:
                for clients in (1, 4):
                    for n in sizes:
                        rows[name, clients, n] = drive(url, bodies[n], clients, args.seconds,
                                                       workdir)
                        print(name, clients, n, rows[name, clients, n], file=sys.stderr)
            finally:
                stop(process)
        in_process = floor(bundle, patients, sizes, args.seconds)

    print(f"\nService benchmark ({chosen} model, {args.patients}-patient simulated cohort, "
          f"{args.workers} worker(s) per server, {args.seconds:g} s per cell, load from a "
          "separate process)\n")
    print(f"Environment: {environment(PACKAGES)}\n")
    print("| server | clients | patients/request | req/s | patients/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for (name, clients, n), r in rows.items():
        print(f"| {name} | {clients} | {n} | {r['rps']:.1f} | {r['rps'] * n:.0f} | "
              f"{r['p50']:.2f} | {r['p99']:.2f} |")
    for n, r in in_process.items():
        print(f"| in-process floor (predict + SHAP) | 1 | {n} | {r['rps']:.1f} | "
              f"{r['rps'] * n:.0f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    ours_name, theirs = "ours (predict + SHAP)", "mlflow models serve (predict)"
    print("\n| ratio | value | target |")
    print("|---|---|---|")
    for n in sizes:
        ratio = rows[ours_name, 4, n]["rps"] / rows[theirs, 4, n]["rps"]
        print(f"| throughput ours / mlflow, 4 clients, {n} patient(s) | {ratio:.1f}x | "
              f"{'>= 10x' if n == 1 else '-'} |")
    print(f"| single-client p50 / p99, 1 patient | {rows[ours_name, 1, 1]['p50']:.2f} / "
          f"{rows[ours_name, 1, 1]['p99']:.2f} ms | <= 3 / 10 ms |")
    print(f"| batch of 1,000 over HTTP / in-process floor (p50) | "
          f"{rows[ours_name, 1, 1000]['p50'] / in_process[1000]['p50']:.2f}x | <= 1.5x |")
    print(f"| start-up to /ready (median of {len(startups)}: "
          f"{', '.join(f'{s:.2f}' for s in startups)} s) | {statistics.median(startups):.2f} s "
          "| <= 3 s |")


if __name__ == "__main__":
    main()
