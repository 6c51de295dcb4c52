"""Forward + backward time of the KAF-UNet against the plain UNet at the same width and input.

Usage::

    python benchmarks/models.py                 # tiny preset and paper width (352 x 352, batch 1)
    python benchmarks/models.py --paper-size 256 --repeats 3
    python benchmarks/models.py --profile tiny  # torch.profiler table of the KAF-UNet step

Each configuration is timed over ``--repeats`` training steps (forward, sum of logits, backward) after
``--warmup`` steps, in training mode, on the CPU (``--threads``, default torch's) or ``--device cuda``
(synchronised). On a shared CPU ``--threads 1`` gives steadier numbers. The UNet and both
KAF-UNet decoder layouts take turns in every round, so a change of machine load hits all of them; a
ratio is the median over rounds of (KAF-UNet time / UNet time), reported beside fastest / fastest.
"doubled" is the authors' network (the paper's parameter counts), "plain" keeps the UNet's decoder.
Beside each time, the step's floating-point operations (PyTorch's FLOP counter: convolutions, matrix
products, attention) and their ratio: a time ratio close to the FLOP ratio means the extra time is
arithmetic the architecture asks for, not overhead. The last line printed is JSON with ``ratio_tiny``
and ``ratio_paper_width`` (the "doubled" network), the same for "plain", the sizes, times and FLOPs.

On a GPU the picture differs (measured on one H100, training steps, K = 200, 352 x 352, batch 8): UNet
f = 48 45 ms, KAF-UNet 246 ms in float32 (5.4x); 36 ms and 242 ms with bfloat16 autocast; 21 ms and
130 ms after ``torch.compile`` (bfloat16). The KAF-UNet's time hardly changes with the batch (batch 1:
246 ms against the UNet's 13 ms): its 4 x T attention blocks on 200 keypoints are thousands of tiny
kernels, so the GPU waits on their launches. Large batches, and CUDA graphs (``torch.compile`` with
``mode="reduce-overhead"``, untested here), are the remedies there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kpssl.models import KAFUNet, UNet, count_flops, count_parameters
from kpssl.settings import ModelSettings, preset


def make_inputs(batch: int, size: int, keypoints: int, device: str = "cpu",
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random image (B, 1, P, P), keypoints (B, K, 2) spread over the patch, all valid."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, size, size, generator=generator)
    points = torch.rand(batch, keypoints, 2, generator=generator) * (size - 1)
    valid = torch.ones(batch, keypoints, dtype=torch.bool)
    return image.to(device), points.to(device), valid.to(device)


def training_step(model: nn.Module, *inputs: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(*inputs).sum().backward()
    return step


def time_interleaved(steps: dict[str, Callable[[], None]], warmup: int, repeats: int,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each step, the steps taking turns in every round.

    Taking turns keeps the comparison fair on a machine whose load changes while the benchmark runs;
    ratios are then taken round by round. On CUDA each step is timed to its completion (synchronised).
    """
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def compare(settings: ModelSettings, batch: int, size: int, keypoints: int, warmup: int, repeats: int,
            label: str, device: str = "cpu") -> dict[str, float]:
    """Time the UNet and both KAF-UNet layouts on one input; print a line each; return the numbers.

    Times are medians over rounds; a ratio is the median over rounds of (KAF-UNet time / UNet time).
    """
    torch.manual_seed(0)
    image, points, valid = make_inputs(batch, size, keypoints, device)
    unet = UNet(settings.in_channels, settings.classes, settings.width)
    models: dict[str, nn.Module] = {"unet": unet.to(device).train()}
    steps = {"unet": training_step(models["unet"], image)}
    for layout in ("doubled", "plain"):
        models[layout] = KAFUNet(dataclasses.replace(settings, kaf_decoder=layout)).to(device).train()
        steps[layout] = training_step(models[layout], image, points, valid)
    flops = {name: count_flops(step) for name, step in steps.items()}
    times = time_interleaved(steps, warmup, repeats, device)
    result = {"unet_s": statistics.median(times["unet"]), "unet_gflop": flops["unet"] / 1e9}
    print(f"[{label}] batch {batch}, {size} x {size}, K = {keypoints}")
    print(f"[{label}] UNet f={settings.width}: {count_parameters(models['unet']) / 1e6:.2f}M params, "
          f"{result['unet_s'] * 1e3:.1f} ms per forward+backward, {flops['unet'] / 1e9:.2f} GFLOP")
    for layout in ("doubled", "plain"):
        ratios = [t / u for t, u in zip(times[layout], times["unet"])]
        result[f"kaf_{layout}_s"] = statistics.median(times[layout])
        result[f"ratio_{layout}"] = statistics.median(ratios)
        result[f"ratio_{layout}_of_minima"] = min(times[layout]) / min(times["unet"])
        result[f"kaf_{layout}_gflop"] = flops[layout] / 1e9
        result[f"flop_ratio_{layout}"] = flops[layout] / flops["unet"]
        print(f"[{label}] KAF-UNet ({layout} decoder, T={settings.attention_blocks}, d={settings.descriptor_dim}, "
              f"hidden={settings.fusion_hidden}): {count_parameters(models[layout]) / 1e6:.2f}M params, "
              f"{result[f'kaf_{layout}_s'] * 1e3:.1f} ms, ratio {result[f'ratio_{layout}']:.2f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f}; fastest / fastest "
              f"{result[f'ratio_{layout}_of_minima']:.2f}); {flops[layout] / 1e9:.2f} GFLOP, FLOP ratio "
              f"{result[f'flop_ratio_{layout}']:.2f}")
    return result


def parse_variant(base: ModelSettings, text: str) -> ModelSettings:
    """``"kaf_decoder=plain,fusion_hidden=8"`` -> ``base`` with those model settings changed."""
    changes: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not hasattr(base, name):
            raise ValueError(f"unknown model setting {name!r} in variant {text!r}")
        default = getattr(base, name)
        if isinstance(default, bool):
            changes[name] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            changes[name] = int(value)
        elif isinstance(default, tuple):
            changes[name] = tuple(c == "1" for c in value)  # kaf_levels=1101
        else:
            changes[name] = value
    return dataclasses.replace(base, **changes)


def compare_variants(base: ModelSettings, variants: list[str], batch: int, size: int, keypoints: int, warmup: int,
                     repeats: int, device: str = "cpu") -> dict[str, float]:
    """Time KAF-UNets with changed model settings against the UNet of the same width (interleaved)."""
    image, points, valid = make_inputs(batch, size, keypoints, device)
    unet = UNet(base.in_channels, base.classes, base.width).to(device).train()
    steps = {"unet": training_step(unet, image)}
    for text in variants:
        model = KAFUNet(parse_variant(base, text)).to(device).train()
        steps[text] = training_step(model, image, points, valid)
    times = time_interleaved(steps, warmup, repeats, device)
    ratios = {}
    for text in variants:
        ratios[text] = statistics.median(t / u for t, u in zip(times[text], times["unet"]))
        print(f"[variant] {text or '(preset)'}: {statistics.median(times[text]) * 1e3:.1f} ms, ratio "
              f"{ratios[text]:.2f} (fastest / fastest {min(times[text]) / min(times['unet']):.2f})")
    return ratios


def profile(settings: ModelSettings, batch: int, size: int, keypoints: int, rows: int = 25,
            device: str = "cpu") -> None:
    """Print the torch.profiler table of one KAF-UNet training step (after two warm-up steps)."""
    image, points, valid = make_inputs(batch, size, keypoints, device)
    model = KAFUNet(settings).to(device).train()
    step = training_step(model, image, points, valid)
    step(), step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny-batch", type=int, default=8)
    parser.add_argument("--paper-size", type=int, default=352)
    parser.add_argument("--paper-batch", type=int, default=1)
    parser.add_argument("--paper-keypoints", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-paper", action="store_true", help="only the tiny preset")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--variant", action="append", default=[],
                        help="also time the tiny KAF-UNet with these model settings, e.g. "
                             "'kaf_decoder=plain,fusion_hidden=8' (repeatable; '' is the preset)")
    parser.add_argument("--profile", choices=["tiny", "paper"], help="print a profiler table instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tiny = preset("tiny")
    tiny_model, tiny_size, tiny_k = tiny.model, tiny.data.patch, tiny.keypoints.max_keypoints
    paper_model = ModelSettings(width=48, attention_blocks=16, descriptor_dim=256, classes=4)
    if args.profile == "tiny":
        profile(tiny_model, args.tiny_batch, tiny_size, tiny_k, device=args.device)
        return
    if args.profile == "paper":
        profile(paper_model, args.paper_batch, args.paper_size, args.paper_keypoints, device=args.device)
        return

    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {args.repeats} rounds "
          f"after {args.warmup} warm-up rounds (paper width: {max(1, args.repeats - 2)} after "
          f"{max(1, args.warmup - 1)})")
    report: dict[str, object] = {"device": args.device, "threads": torch.get_num_threads()}
    result = compare(tiny_model, args.tiny_batch, tiny_size, tiny_k, args.warmup, args.repeats, "tiny", args.device)
    report.update(ratio_tiny=result["ratio_doubled"], ratio_tiny_plain_decoder=result["ratio_plain"],
                  tiny={"width": tiny_model.width, "descriptor_dim": tiny_model.descriptor_dim,
                        "attention_blocks": tiny_model.attention_blocks, "fusion_hidden": tiny_model.fusion_hidden,
                        "patch": tiny_size, "keypoints": tiny_k, "batch": args.tiny_batch, **result})
    if args.variant:
        report["tiny_variants"] = compare_variants(tiny_model, args.variant, args.tiny_batch, tiny_size, tiny_k,
                                                   args.warmup, args.repeats, args.device)
    if not args.skip_paper:
        result = compare(paper_model, args.paper_batch, args.paper_size, args.paper_keypoints,
                         max(1, args.warmup - 1), max(1, args.repeats - 2), "paper width", args.device)
        report.update(ratio_paper_width=result["ratio_doubled"], ratio_paper_width_plain_decoder=result["ratio_plain"],
                      paper_width={"width": 48, "descriptor_dim": 256, "attention_blocks": 16, "fusion_hidden": 64,
                                   "patch": args.paper_size, "keypoints": args.paper_keypoints,
                                   "batch": args.paper_batch, **result})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
