"""The baselines of the step and start-up cases: a hand-written single-process training loop.

``--loader dataloader`` is the plain loop everyone writes (a ``DataLoader`` over a
``TensorDataset``: per-sample ``__getitem__`` and collation); ``--loader slice`` is a
tuned one that batches the in-memory tensors by index slicing, as xp's ``EpochLoader``
does. No MLflow: the loss is read (``.item()``) every 10 steps, as a loop that prints it.
``--framework fabric`` and ``--framework accelerate`` run the plain loop through Lightning
Fabric or Hugging Face accelerate (``pip install -e ".[bench]"``) on the CPU. ``--mlflow URI``
records it the way the MLflow docs show, in this process: a run with the arguments as
params, ``train/loss`` every 10 steps (``log_metric``), the arguments as ``config.yaml``
at the end (the start-up case's loop with MLflow, for memory).

Prints one JSON line: wall and CPU seconds per step over steps ``warmup + 1 .. steps``,
the wall-clock time (``time.time()``) at the end of step ``--mark-step``, and the
process's minor page faults.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from xp.data import digits
from xp.model import MLP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loader", choices=["dataloader", "slice"], default="dataloader")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--mark-step", type=int, default=100)
    parser.add_argument("--framework", choices=["torch", "fabric", "accelerate"], default="torch")
    parser.add_argument("--mlflow", default=None, help="a tracking URI: record the run there")
    args = parser.parse_args()
    if args.mlflow:
        import mlflow

        mlflow.set_tracking_uri(args.mlflow)
        mlflow.set_experiment("bench")
        mlflow.start_run()
        mlflow.log_params(vars(args))

    torch.manual_seed(0)
    # xp's own training split, read the same way (without importing sklearn): the same
    # data and the same start-up cost for it on both sides.
    x, y = digits().train.tensors
    model = MLP(64, args.hidden, 10, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    backward = Tensor.backward
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    if args.framework == "fabric":
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
        model, optimizer = fabric.setup(model, optimizer)
        loader = fabric.setup_dataloaders(loader)
        backward = fabric.backward
    elif args.framework == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        backward = accelerator.backward

    def batches() -> Iterable[tuple[Tensor, Tensor]]:
        if args.loader == "dataloader":
            return loader  # type: ignore[no-any-return]
        return ((x[i], y[i]) for i in torch.randperm(len(y)).split(args.batch_size))

    step, start, cpu_start, marked = 0, 0.0, 0.0, 0.0
    model.train()
    while step < args.steps:
        for inputs, targets in batches():
            loss = F.cross_entropy(model(inputs), targets)
            backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:
                value = loss.item()
                if args.mlflow:
                    mlflow.log_metric("train/loss", value, step=step)
            if step == args.mark_step:
                marked = time.time()
            if step == args.warmup:
                start, cpu_start = time.perf_counter(), time.thread_time()
            if step >= args.steps:
                break
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    if args.mlflow:
        mlflow.log_dict(vars(args), "config.yaml")
        mlflow.end_run()
    steps = max(1, args.steps - args.warmup)
    print(
        json.dumps(
            {
                "step_s": elapsed / steps,
                "cpu_step_s": cpu / steps,
                "mark_time": marked,
                "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
            }
        )
    )


if __name__ == "__main__":
    main()
