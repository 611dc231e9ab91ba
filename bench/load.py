"""Closed-loop HTTP load: N client processes, each POSTing one body back to back.

Run as its own process by bench_service.py, so the load generator never shares an
interpreter (or a GIL) with the server it measures. Prints JSON: every request's latency in
ms, the wall time, and the number of non-200 answers.

    python bench/load.py --url http://127.0.0.1:8000/v1/predict --body body.json \\
        --clients 4 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import httpx


def _client(url: str, body: bytes, headers: dict[str, str], seconds: float, warmup: int
            ) -> tuple[list[float], int]:
    latencies, errors = [], 0
    with httpx.Client(timeout=120) as client:
        for _ in range(warmup):
            client.post(url, content=body, headers=headers)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = client.post(url, content=body, headers=headers)
            latencies.append((time.perf_counter() - started) * 1000)
            errors += response.status_code != 200
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    body = args.body.read_bytes()
    headers = {"content-type": "application/json"}
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        results = pool.starmap(_client, [(args.url, body, headers, args.seconds, args.warmup)
                                         for _ in range(args.clients)])
    elapsed = time.perf_counter() - started
    latencies = [t for times, _ in results for t in times]
    print(json.dumps({"latencies_ms": latencies, "seconds": args.seconds,
                      "wall": elapsed, "errors": sum(e for _, e in results)}))


if __name__ == "__main__":
    main()
