"""Benchmark `itp-train train` as `make run` calls it: wall time, stages and peak memory,
and how they grow with patients and with taxa.

Defaults are the `make run` settings (preset fast, 5 outer folds, 5 permutations, 1000
patient-bootstrap resamples, register + export, --jobs 2) on simulated cohorts from 100 to
2,000 patients (at the simulator's ~290 species), then 200 to 2,000 taxa (at 400 patients;
taxa beyond the simulator's catalogue are sparse noise species). The stage split comes from
when the CLI's log lines arrive; peak RSS is sampled over the whole process tree, so
parallel workers are counted too. Each row's time is also given as a ratio to the first
row of its axis, measured in the same run.

    .venv/bin/python bench/bench_training.py                       # both axes
    .venv/bin/python bench/bench_training.py --sizes 400 --taxa "" --jobs 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
from environment import environment

BIN = Path(sys.executable).parent
MODEL = "itp-response"
PAGE = os.sysconf("SC_PAGE_SIZE")
PACKAGES = ("scikit-learn", "xgboost-cpu", "shap", "numpy", "pandas", "mlflow", "joblib")


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants, now (0 for processes gone)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        members.update(children)
        frontier.extend(children)
    total = 0
    for pid in members:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


@dataclass
class Run:
    patients: int
    jobs: int
    taxa: int = 0
    axis: str = "patients"  # which axis of the benchmark grid the run belongs to
    wall: float = 0.0
    peak_tree: int = 0
    peak_process: int = 0  # largest single process (ru_maxrss of the reaped tree)
    events: list[tuple[float, str]] = field(default_factory=list)
    result: dict[str, object] = field(default_factory=dict)

    def at(self, pattern: str) -> float | None:
        """Seconds from spawn to the first log line matching `pattern`."""
        return next((t for t, line in self.events if re.search(pattern, line)), None)

    def episodes(self) -> str:
        found = (re.search(r"cohort .*: (\d+) episodes", line) for _, line in self.events)
        return next((m.group(1) for m in found if m), "?")

    def stages(self) -> list[float | None]:
        """Seconds: start-up + cohort load, nested CV (with its figures), the permutation
        control, then final search + SHAP + MLflow logging + registration + export."""
        marks = [0.0, self.at(r": cohort "), self.at(r"nested CV AUROC"),
                 self.at(r"permuted-label control AUROC") or self.at(r"nested CV AUROC"),
                 self.wall]
        return [b - a if a is not None and b is not None else None
                for a, b in pairwise(marks)]


def train(data: Path, patients: int, jobs: int, args: argparse.Namespace, workdir: Path
          ) -> Run:
    """One `itp-train train` in a fresh SQLite store, sampled every 0.2 s until it exits."""
    run = Run(patients=patients, jobs=jobs)
    tag = f"{patients}-{data.name}-j{jobs}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / f'mlflow-{tag}.db'}",
           "MPLCONFIGDIR": str(workdir / "mpl")}
    command = [str(BIN / "itp-train"), "train", "--data", str(data), "--experiment", MODEL,
               "--register", MODEL, "--alias", "champion", "--preset", args.preset,
               "--splits", str(args.splits),
               "--bootstrap", str(args.bootstrap), "--seed", str(args.seed),
               "--permutations", str(args.permutations),
               "--jobs", str(jobs), "--export", str(workdir / f"models-{tag}" / MODEL)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    stdout: list[str] = []

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            run.events.append((time.perf_counter() - started, line.rstrip()))

    def read_stdout() -> None:
        assert process.stdout is not None
        stdout.append(process.stdout.read())

    readers = [threading.Thread(target=read_stderr), threading.Thread(target=read_stdout)]
    for reader in readers:
        reader.start()
    deadline = started + args.timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.kill()
            sys.exit(f"itp-train did not finish within {args.timeout}s")
        run.peak_tree = max(run.peak_tree, tree_rss(process.pid))
        time.sleep(0.2)
    run.wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    run.peak_process = usage.ru_maxrss * 1024
    if process.returncode != 0:
        tail = "\n".join(line for _, line in run.events[-30:])
        sys.exit(f"itp-train failed ({process.returncode}):\n{tail}")
    run.result = json.loads(stdout[0])
    return run


def with_taxa(table: pd.DataFrame, n_taxa: int, seed: int) -> pd.DataFrame:
    """The feature table cut or padded to `n_taxa` rows: padding adds sparse noise species
    (30% prevalence, a few reads each), the long tail a real 16S or shotgun table has."""
    if n_taxa <= len(table):
        return table.loc[table.sum(axis=1).sort_values(ascending=False).index[:n_taxa]]
    rng = np.random.default_rng(seed)
    extra = n_taxa - len(table)
    reads = rng.poisson(3.0, size=(extra, table.shape[1])) * (
        rng.random((extra, table.shape[1])) < 0.3)
    names = [f"d__Bacteria;p__Firmicutes;c__Clostridia;o__Noise;f__Noise{i // 20};"
             f"g__Noise{i // 4};s__Noise{i // 4}_sp{i % 4}" for i in range(extra)]
    return pd.concat([table, pd.DataFrame(reads, index=names, columns=table.columns)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,400,1000,2000",
                        help="cohort sizes (patients), at the simulator's taxa")
    parser.add_argument("--taxa", default="200,1000,2000",
                        help="taxa counts, at --taxa-patients patients (empty: skip)")
    parser.add_argument("--taxa-patients", type=int, default=400)
    parser.add_argument("--jobs", default="2", help="comma-separated --jobs values to compare")
    parser.add_argument("--permutations", type=int, default=5)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per training run")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything here instead of a temporary directory")
    args = parser.parse_args()

    from training.simulate import SCENARIOS, simulate, write_cohort

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="itp-bench-train-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        grid = [(int(s), 0, "patients") for s in args.sizes.split(",") if s]
        grid += [(args.taxa_patients, int(t), "taxa") for t in args.taxa.split(",") if t]
        for size, taxa, axis in grid:
            cohort = simulate(size, args.seed, SCENARIOS["default"])
            if taxa:
                cohort = replace(cohort, feature_table=with_taxa(cohort.feature_table, taxa,
                                                                 args.seed))
            data = workdir / f"cohort-{size}-{taxa or 'sim'}"
            write_cohort(cohort, data)
            for jobs in (int(j) for j in args.jobs.split(",")):
                run = train(data, size, jobs, args, workdir)
                run.taxa, run.axis = len(cohort.feature_table), axis
                print(f"{size} patients, {run.taxa} taxa, --jobs {jobs}: {run.wall:.0f}s",
                      file=sys.stderr)
                runs.append(run)

    print(f"\nTraining benchmark: itp-train train --preset {args.preset}, {args.splits} outer "
          f"folds, {args.bootstrap} bootstrap, register + export\n")
    print(f"Environment: {environment(PACKAGES)}\n")
    stage_names = ["start-up + load", "nested CV", "permutation control",
                   "final search, SHAP, log, register, export"]
    print("| axis | patients | episodes | taxa | --jobs | wall | time ratio to the axis's first | "
          + " | ".join(stage_names)
          + " | peak RSS, tree | peak RSS, largest process | chosen (CV AUROC) |")
    print("|---" * (len(stage_names) + 10) + "|")
    first: dict[tuple[str, int], Run] = {}
    for run in runs:
        base = first.setdefault((run.axis, run.jobs), run)
        stages = " | ".join("?" if s is None else f"{s:.0f} s" for s in run.stages())
        picked = run.result["chosen"]
        summaries = run.result["summaries"]
        assert isinstance(summaries, dict) and isinstance(picked, dict)
        chosen = f"{picked['family']} ({picked['feature_set']})"
        auroc = summaries["champion"]["auroc_mean"]
        print(f"| {run.axis} | {run.patients} | {run.episodes()} | {run.taxa} | {run.jobs} | "
              f"{run.wall:.0f} s | {run.wall / base.wall:.2f} | {stages} | "
              f"{run.peak_tree / 2**20:.0f} MiB | {run.peak_process / 2**20:.0f} MiB | "
              f"{chosen} ({auroc:.3f}) |")


if __name__ == "__main__":
    main()
