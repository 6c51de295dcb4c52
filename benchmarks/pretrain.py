"""Pretraining throughput: pairs per second for each method (model, losses and data together).

    python benchmarks/pretrain.py [--steps 6] [--workers 2] [--paper-size 128]

For the ``tiny`` preset on the synthetic data, each method runs full optimisation steps (data loading with
DataLoader workers, forward, losses, backward, SGD) and the script prints pairs per second and the
time of a KAF step over a PCL step, measured in the same run. A paper-width configuration (f = 48,
T = 16, d = 256, K = 200) follows at a patch the CPU can run (``--paper-size``), model and losses only
(a fixed batch), for ``kaf`` and ``pcl``. Each step's floating-point operations are counted too (PyTorch's
FLOP counter), so the time ratio can be set beside the arithmetic the architectures ask for. The last
line is JSON with ``tiny_pairs_per_s`` (method -> pairs/s), ``kaf_over_pcl_time_tiny``,
``kaf_over_pcl_flops_tiny`` and the paper-width figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kpssl.data.slices import load_volumes
from kpssl.data.synthetic import write_synthetic_acdc
from kpssl.keypoints import KeypointCache, PairDataset, collate_pairs
from kpssl.models import count_flops
from kpssl.settings import preset
from kpssl.train.common import EpochOrder
from kpssl.train.networks import METHODS, PretrainNetwork


def time_steps(network: PretrainNetwork, batches, steps: int, warmup: int = 2) -> float:
    """Seconds per optimisation step, median over ``steps`` after ``warmup`` (batches from an iterator)."""
    optimiser = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    network.train()
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        loss, _ = network(batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def step_flops(network: PretrainNetwork, batch: dict) -> int:
    """Floating-point operations of one forward and backward pass on ``batch``."""
    def step() -> None:
        loss, _ = network(batch)
        loss.backward()
    flops = count_flops(step)
    network.zero_grad(set_to_none=True)
    return flops


def loader_batches(dataset: PairDataset, batch_size: int, workers: int):
    order = EpochOrder(len(dataset), batch_size, seed=0)
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        yield from DataLoader(dataset, batch_sampler=list(order.batches(epoch)), num_workers=workers,
                              collate_fn=collate_pairs)
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--paper-size", type=int, default=128, help="patch side for the paper-width run")
    parser.add_argument("--paper-batch", type=int, default=2)
    args = parser.parse_args()

    settings = preset("tiny")
    results: dict = {"threads": torch.get_num_threads(), "workers": args.workers, "tiny_pairs_per_s": {}}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "synthetic"
        write_synthetic_acdc(root, patients=args.patients, seed=0)
        volumes = load_volumes(root, settings.data, labels=False)
        dataset = PairDataset(volumes, settings, KeypointCache(root), seed=0).prepare()
        seconds, flops = {}, {}
        fixed = collate_pairs([dataset[i] for i in range(settings.pretrain.batch_size)])
        print(f"tiny preset: patch {settings.data.patch}, batch {settings.pretrain.batch_size}, "
              f"K {settings.keypoints.max_keypoints}, {args.workers} loader workers, {results['threads']} threads")
        for method in METHODS:
            torch.manual_seed(0)
            network = PretrainNetwork(method, settings.model, settings.pretrain)
            flops[method] = step_flops(network, fixed)
            batches = loader_batches(dataset, settings.pretrain.batch_size, args.workers)
            seconds[method] = time_steps(network, batches, args.steps)
            rate = settings.pretrain.batch_size / seconds[method]
            results["tiny_pairs_per_s"][method] = round(rate, 2)
            print(f"  {method:>7}: {seconds[method] * 1000:8.1f} ms per step, {rate:7.1f} pairs/s, "
                  f"{flops[method] / 1e9:.2f} GFLOP per step")
        results["kaf_over_pcl_time_tiny"] = round(seconds["kaf"] / seconds["pcl"], 3)
        results["tiny_gflop_per_step"] = {m: round(v / 1e9, 3) for m, v in flops.items()}
        results["kaf_over_pcl_flops_tiny"] = round(flops["kaf"] / flops["pcl"], 3)
        print(f"  KAF step / PCL step: {results['kaf_over_pcl_time_tiny']:.2f} in time, "
              f"{results['kaf_over_pcl_flops_tiny']:.2f} in FLOPs")

        paper = preset("paper_acdc").replace(**{"data.patch": args.paper_size,
                                                 "pretrain.batch_size": args.paper_batch,
                                                 "pretrain.sinkhorn_iterations": 100})
        dataset = PairDataset(load_volumes(root, paper.data, labels=False)[:2], paper, KeypointCache(root), seed=0)
        batch = collate_pairs([dataset[i] for i in range(args.paper_batch)])
        print(f"paper width (f=48, T=16, d=256, K=200) at {args.paper_size} x {args.paper_size}, "
              f"batch {args.paper_batch}, fixed batch (no loader):")
        paper_seconds, paper_flops = {}, {}
        for method in ("kaf", "pcl"):
            torch.manual_seed(0)
            network = PretrainNetwork(method, paper.model, paper.pretrain)
            paper_flops[method] = step_flops(network, batch)
            paper_seconds[method] = time_steps(network, iter(lambda: batch, None), max(2, args.steps // 2), warmup=1)
            print(f"  {method:>7}: {paper_seconds[method]:8.2f} s per step, {paper_flops[method] / 1e9:.1f} GFLOP")
        results["paper_width"] = {"patch": args.paper_size, "batch": args.paper_batch,
                                  "seconds_per_step": {k: round(v, 3) for k, v in paper_seconds.items()},
                                  "gflop_per_step": {k: round(v / 1e9, 2) for k, v in paper_flops.items()},
                                  "kaf_over_pcl_time": round(paper_seconds["kaf"] / paper_seconds["pcl"], 3),
                                  "kaf_over_pcl_flops": round(paper_flops["kaf"] / paper_flops["pcl"], 3)}
        print(f"  KAF step / PCL step: {results['paper_width']['kaf_over_pcl_time']:.2f} in time, "
              f"{results['paper_width']['kaf_over_pcl_flops']:.2f} in FLOPs")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
