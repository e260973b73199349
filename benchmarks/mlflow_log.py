"""MLflow's own ways to log a scalar, timed on the calling thread, into a SQLite store.

``MlflowClient.log_metric`` (a write per call), ``mlflow.log_metric(synchronous=False)``
(MLflow's async queue; the time until the call returns), and ``log_batch`` of metrics
buffered by hand (4 scalars a step, written every 10 steps; per metric, building the
``Metric`` entities included). Prints one JSON line of seconds per scalar.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TIMED_CALLS = 200
"""Calls timed per API (after 10 untimed ones)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=TIMED_CALLS)
    args = parser.parse_args()

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = f"sqlite:///{args.store.as_posix()}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("mlflow-reference")
    run_id = client.create_run(experiment_id).info.run_id

    def log_sync(step: int) -> None:
        client.log_metric(run_id, "sync/loss", 0.5, step=step)

    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id)

    def log_async(step: int) -> None:
        mlflow.log_metric("async/loss", 0.5, step=step, synchronous=False)

    buffer: list[Metric] = []

    def log_buffered(step: int) -> None:
        now = int(time.time() * 1000)
        for key in ("batch/loss", "batch/samples_per_s", "batch/epoch", "batch/lr"):
            buffer.append(Metric(key, 0.5, now, step))
        if step % 10 == 9:
            client.log_batch(run_id, metrics=buffer)
            buffer.clear()

    def per_call(log: object, scalars_per_call: int) -> float:
        for step in range(10):
            log(step)  # type: ignore[operator]
        start = time.perf_counter()
        for step in range(10, 10 + args.calls):
            log(step)  # type: ignore[operator]
        return (time.perf_counter() - start) / (args.calls * scalars_per_call)

    out = {
        "log_metric_s": per_call(log_sync, 1),
        "log_metric_async_s": per_call(log_async, 1),
        "log_batch_s_per_metric": per_call(log_buffered, 4),
    }
    mlflow.flush_async_logging()
    mlflow.end_run()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
