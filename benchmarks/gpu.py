"""Paper-scale speed: the UNet and the KAF-UNet at paper width, pretraining and fine-tuning steps.

    python benchmarks/gpu.py                 # on a GPU: f = 48, 352 x 352, K = 200, T = 16, d = 256
    python benchmarks/gpu.py --small         # on a CPU: the same measurements at a toy size

Measures, each in one run on one card:
1. the card's bf16 matrix-multiply rate (the ceiling achieved TFLOP/s is compared with);
2. forward + backward of the UNet and the KAF-UNet in float32, bf16 autocast, bf16 + channels_last and
   ``torch.compile`` (where it works): images per second;
3. full pretraining steps (``kaf`` and ``pcl``: model, heads, losses, SGD) and fine-tuning steps (Adam,
   cross-entropy): pairs or images per second, peak memory, the step split into forward, backward and
   optimiser, floating-point operations counted with PyTorch's FLOP counter and the achieved TFLOP/s;
4. the data loader: pairs per second from the keypoint pair dataset with 0..N workers, and the fraction of
   wall time the GPU is busy when training from the loader with the chosen number of workers.

Prints a table, then one line of JSON (keys ``device``, ``kaf_pretrain_pairs_per_s``,
``pcl_pretrain_pairs_per_s``, ``kaf_over_pcl_tflops``, ``peak_memory_gib``, ``gpu_busy_fraction``,
``acceptance`` and the details); with ``--out FILE`` the JSON is also written there.

Precision is the library's rule (:func:`kpssl.train.common.amp_dtype_for`: bf16 from compute capability
8.0, fp16 below, float32 on the CPU); the pretraining steps run as the training loop runs them
(channels_last on CUDA, match checks done at collate time, no host read in the step). ``acceptance``
compares the figures with the targets of the GPU work (KAF >= 150 pairs/s, PCL >= 450 pairs/s, KAF's
achieved TFLOP/s >= 0.8 x PCL's, GPU busy >= 0.9 from the loader, bf16 where the card has it); the
targets are for paper width on an H100/H200 and mean nothing at ``--small``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from kpssl.data.slices import load_volumes
from kpssl.data.synthetic import write_synthetic_acdc
from kpssl.keypoints import KeypointCache, PairDataset, collate_pairs
from kpssl.models.kaf_unet import KAFUNet
from kpssl.models.unet import UNet
from kpssl.settings import preset
from kpssl.train.common import EpochOrder, amp_dtype_for
from kpssl.train.networks import PretrainNetwork

ROWS: list[tuple[str, str]] = []


def report(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name:<58} {value}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def matmul_rate(device: torch.device) -> float:
    """bf16 TFLOP/s of a large square product on random data (float32 on the CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * n**3 / seconds / 1e12


def random_keypoints(batch: int, k: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    keypoints = torch.rand(batch, k, 2, device=device) * (size - 1)
    valid = torch.rand(batch, k, device=device) < 0.9
    return keypoints, valid


def count_flops(fn: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def model_step_variants(args, settings, device, results) -> None:
    """Forward + backward images/s of UNet and KAF-UNet under each precision/layout variant."""
    m, size, batch, k = settings.model, args.size, args.batch, settings.keypoints.max_keypoints
    image = torch.randn(batch, 1, size, size, device=device)
    label = torch.randint(0, m.classes, (batch, size, size), device=device)
    keypoints, valid = random_keypoints(batch, k, size, device)
    variants = [("float32", None, False, False), ("bf16", torch.bfloat16, False, False),
                ("bf16+channels_last", torch.bfloat16, True, False), ("bf16+compile", torch.bfloat16, False, True)]
    variants = [v for v in variants if v[3] == args.compiled_only]
    if device.type != "cuda":
        variants = [v for v in variants if v[1] is None]
    results.setdefault("model_images_per_s", {})
    for name, build in (("unet", lambda: UNet(m.in_channels, m.classes, m.width)), ("kaf_unet", lambda: KAFUNet(m))):
        for variant, dtype, channels_last, compiled in variants:
            try:
                torch.manual_seed(0)
                model = build().to(device)
                x = image
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                    x = image.contiguous(memory_format=torch.channels_last)
                run = torch.compile(model) if compiled else model
                autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

                def step() -> None:
                    with autocast:
                        logits = run(x) if name == "unet" else run(x, keypoints, valid)
                    F.cross_entropy(logits.float(), label).backward()

                seconds = median_seconds(step, device, args.repeats, warmup=3 if compiled else 2)
                rate = batch / seconds
                results["model_images_per_s"][f"{name}/{variant}"] = round(rate, 2)
                report(f"{name} fwd+bwd {variant} (batch {batch})", f"{rate:9.1f} img/s")
            except Exception as error:  # a variant that does not work here is reported, not fatal
                results["model_images_per_s"][f"{name}/{variant}"] = None
                report(f"{name} fwd+bwd {variant}", f"failed: {type(error).__name__}: {str(error)[:80]}")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def pair_dataset(root: Path, settings, patients: int) -> PairDataset:
    volumes = load_volumes(root, settings.data, labels=False)
    return PairDataset(volumes, settings, KeypointCache(root), seed=0).prepare()


def pretrain_steps(args, settings, dataset, device, amp, results, matmul_tflops) -> None:
    """Pretraining steps of kaf and pcl on fixed batches: rate, memory, split, FLOPs."""
    batch_size = settings.pretrain.batch_size
    batch = collate_pairs([dataset[i % len(dataset)] for i in range(batch_size)])
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    batch = {k: v.to(device, memory_format=memory_format) if v.ndim == 4 else v.to(device) for k, v in batch.items()}
    autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    for method in ("pcl", "kaf"):
        torch.manual_seed(0)
        network = PretrainNetwork(method, settings.model, settings.pretrain).to(device, memory_format=memory_format)
        if method == "kaf":
            network.matching_loss.check_matches = False  # as in training: collate_pairs checked the batch
        optimiser = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def step() -> None:
            with autocast:
                loss, _ = network(batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = median_seconds(step, device, args.repeats, warmup=2)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0  # 0: not measured
        # the split: forward, backward, optimiser, each synchronised
        parts = {"forward": [], "backward": [], "optimiser": []}
        for _ in range(max(3, args.repeats // 2)):
            sync(device)
            t0 = time.perf_counter()
            with autocast:
                loss, _ = network(batch)
            sync(device)
            t1 = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            optimiser.step()
            sync(device)
            t3 = time.perf_counter()
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[key].append(value)
        split = {k: round(sorted(v)[len(v) // 2] * 1000, 2) for k, v in parts.items()}
        flops = count_flops(step)
        rate = batch_size / seconds
        results[f"{method}_pretrain_pairs_per_s"] = round(rate, 2)
        results.setdefault("pretrain", {})[method] = {
            "batch": batch_size, "seconds_per_step": round(seconds, 4), "pairs_per_s": round(rate, 2),
            "peak_memory_gib": round(peak, 2) if device.type == "cuda" else None, "split_ms": split, "gflop_per_step": round(flops / 1e9, 1),
            "achieved_tflops": round(flops / seconds / 1e12, 2),
            "fraction_of_matmul_rate": round(flops / seconds / 1e12 / matmul_tflops, 3)}
        report(f"pretrain {method} step (batch {batch_size} pairs)",
               f"{rate:9.1f} pairs/s, {peak:5.1f} GiB, {flops / seconds / 1e12:6.1f} TFLOP/s, split ms {split}")
        del network, optimiser
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["kaf_over_pcl_throughput"] = round(results["kaf_pretrain_pairs_per_s"] / results["pcl_pretrain_pairs_per_s"], 3)
    report("KAF pretraining throughput / PCL", f"{results['kaf_over_pcl_throughput']:.3f}")
    rate = {m: results["pretrain"][m]["gflop_per_step"] / results["pretrain"][m]["seconds_per_step"] for m in ("kaf", "pcl")}
    results["kaf_over_pcl_tflops"] = round(rate["kaf"] / rate["pcl"], 3) if rate["pcl"] else None
    report("KAF achieved TFLOP/s / PCL's", f"{results['kaf_over_pcl_tflops']}")


def finetune_steps(args, settings, device, amp, results) -> None:
    m, size = settings.model, args.size
    batch = settings.finetune.batch_size
    image = torch.randn(batch, 1, size, size, device=device)
    label = torch.randint(0, m.classes, (batch, size, size), device=device)
    keypoints, valid = random_keypoints(batch, settings.keypoints.max_keypoints, size, device)
    autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    for name, model in (("unet", UNet(m.in_channels, m.classes, m.width)), ("kaf_unet", KAFUNet(m))):
        model = model.to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)

        def step() -> None:
            with autocast:
                logits = model(image, keypoints, valid)  # as fine-tuning calls both (the UNet ignores them)
            loss = F.cross_entropy(logits.float(), label)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        seconds = median_seconds(step, device, args.repeats, warmup=2)
        results.setdefault("finetune_images_per_s", {})[name] = round(batch / seconds, 2)
        report(f"finetune {name} step (batch {batch})", f"{batch / seconds:9.1f} img/s")
        del model, optimiser


def loader_and_busy(args, settings, dataset, device, amp, results) -> None:
    """Pairs/s from the loader alone per worker count, then GPU-busy fraction while training kaf from it."""
    batch_size = settings.pretrain.batch_size
    order = EpochOrder(len(dataset), batch_size, seed=0)
    results["loader_pairs_per_s"] = {}
    for workers in args.workers:
        dataset.set_epoch(0)
        loader = DataLoader(dataset, batch_sampler=list(order.batches(0)), num_workers=workers,
                            collate_fn=collate_pairs, pin_memory=device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if workers else None)
        iterator = iter(loader)
        next(iterator)  # start-up of the workers stays out of the rate
        start, count = time.perf_counter(), 0
        for batch in iterator:
            count += batch["view1"].shape[0]
            if count >= args.loader_pairs:
                break
        rate = count / (time.perf_counter() - start)
        results["loader_pairs_per_s"][str(workers)] = round(rate, 1)
        report(f"loader alone, {workers} workers", f"{rate:9.1f} pairs/s")
    # training kaf from the loader: busy = summed device step time / wall time
    workers = args.busy_workers
    torch.manual_seed(0)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    network = PretrainNetwork("kaf", settings.model, settings.pretrain).to(device, memory_format=memory_format)
    network.matching_loss.check_matches = False
    optimiser = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    busy, wall, steps = 0.0, 0.0, 0
    epoch = 0
    while steps < args.busy_steps:
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=list(order.batches(epoch)), num_workers=workers,
                            collate_fn=collate_pairs, pin_memory=device.type == "cuda",
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        iterator = iter(loader)
        first = next(iterator)
        sync(device)
        started = time.perf_counter()
        for batch in [first, *iterator]:
            batch = {k: v.to(device, non_blocking=True, memory_format=memory_format) if v.ndim == 4
                     else v.to(device, non_blocking=True) for k, v in batch.items()}
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            t0 = time.perf_counter()
            with autocast:
                loss, _ = network(batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if device.type == "cuda":
                end.record()
                end.synchronize()
                busy += begin.elapsed_time(end) / 1000
            else:
                busy += time.perf_counter() - t0
            steps += 1
            if steps >= args.busy_steps:
                break
        sync(device)
        wall += time.perf_counter() - started
        epoch += 1
    results["gpu_busy_fraction"] = round(busy / wall, 3)
    results["busy_workers"] = workers
    results["kaf_pretrain_pairs_per_s_from_loader"] = round(steps * batch_size / wall, 2)
    report(f"kaf training from the loader, {workers} workers",
           f"busy {busy / wall:.1%}, {steps * batch_size / wall:.1f} pairs/s")


def acceptance(results: dict, device: torch.device) -> dict:
    """Each target of the GPU work: the measured value, the target and whether it is met (None: not measured)."""
    bf16_card = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    targets = {"kaf_pretrain_pairs_per_s": 150.0, "pcl_pretrain_pairs_per_s": 450.0, "kaf_over_pcl_tflops": 0.8,
               "gpu_busy_fraction": 0.9}
    table = {}
    for key, target in targets.items():
        value = results.get(key)
        table[key] = {"value": value, "target": target, "met": None if value is None else value >= target}
    table["bf16_default"] = {"value": results.get("precision"), "target": "bf16 autocast",
                             "met": results.get("precision") == "bf16 autocast" if bf16_card else None}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="toy sizes for a CPU check")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8, 12])
    parser.add_argument("--busy-workers", type=int, default=8)
    parser.add_argument("--busy-steps", type=int, default=30)
    parser.add_argument("--loader-pairs", type=int, default=400)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], choices=["variants", "pretrain", "finetune", "loader", "compile"])
    parser.add_argument("--out", help="also write the JSON here (rewritten after every section)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = preset("paper_acdc")
    if args.small:
        settings = settings.replace(**{
            "data.patch": 64, "data.spacing_mm": [2.5, 2.5], "keypoints.max_keypoints": 32, "model.width": 8,
            "model.attention_blocks": 2, "model.descriptor_dim": 32, "model.fusion_hidden": 16,
            "pretrain.batch_size": 4, "pretrain.sinkhorn_iterations": 10, "finetune.batch_size": 4})
        args.repeats, args.workers, args.busy_workers = 3, [0, 2], 2
        args.busy_steps, args.loader_pairs, args.patients = 4, 16, 4
    args.size, args.batch = settings.data.patch, (16 if device.type == "cuda" and not args.small else 2)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = amp_dtype_for(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                     "precision": {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(amp, "float32"),
                     "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
                     "patch": args.size,
                     "width": settings.model.width, "keypoints": settings.keypoints.max_keypoints,
                     "attention_blocks": settings.model.attention_blocks,
                     "descriptor_dim": settings.model.descriptor_dim}
    report("device", f"{name}, torch {torch.__version__}, {os.cpu_count()} CPU cores")
    tflops = matmul_rate(device)
    results["matmul_tflops"] = round(tflops, 1)
    report("matrix-multiply ceiling", f"{tflops:9.1f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})")
    def save() -> None:  # after every section, so a run cut short still leaves its numbers
        if "pretrain" in results and device.type == "cuda":
            results["peak_memory_gib"] = max(v["peak_memory_gib"] for v in results["pretrain"].values())
        results["acceptance"] = acceptance(results, device)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))

    args.compiled_only = False
    if "variants" not in args.skip:
        model_step_variants(args, settings, device, results)
        save()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "synthetic"
        write_synthetic_acdc(root, patients=args.patients, seed=0)
        dataset = pair_dataset(root, settings, args.patients)
        if "pretrain" not in args.skip:
            pretrain_steps(args, settings, dataset, device, amp, results, tflops)
            save()
        if "finetune" not in args.skip:
            finetune_steps(args, settings, device, amp, results)
            save()
        if "loader" not in args.skip:
            loader_and_busy(args, settings, dataset, device, amp, results)
            save()
    if "variants" not in args.skip and "compile" not in args.skip and device.type == "cuda":
        args.compiled_only = True  # last: compilation takes minutes and may fail
        model_step_variants(args, settings, device, results)
        save()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
