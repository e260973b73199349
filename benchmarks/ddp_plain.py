"""The baseline: a hand-written DDP training script doing the work of the xp DDP case.

Launched with torchrun; prints one JSON line from rank 0 with the steady-state throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from xp.model import MLP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target)
    train_idx, _ = train_test_split(
        range(len(y)), test_size=0.2, random_state=0, stratify=bunch.target
    )
    dataset = TensorDataset(x[train_idx], y[train_idx])
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)

    model = DistributedDataParallel(MLP(64, [128, 128], 10, dropout=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    step, epoch, start = 0, 0, 0.0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:  # what a hand-written loop prints: the global mean loss
                logged = loss.detach().clone()
                dist.all_reduce(logged)
                logged.item()
            if step == args.warmup:
                start = time.perf_counter()
            if step >= args.steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    samples = (args.steps - args.warmup) * args.batch_size * world
    if rank == 0:
        print(json.dumps({"samples_per_s": samples / elapsed, "seconds": elapsed}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
