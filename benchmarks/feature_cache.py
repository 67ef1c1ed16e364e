"""Feature-cache fill rate against a plain forward of the same frozen backbone (issue 17, part 5).

What is measured
    Images per second of ``FeatureCache.encode`` on an empty cache directory (key, preprocessing, forward,
    the write) for the first ``--images`` training images of Split-Fashion-MNIST with the scenario's frozen
    EfficientNet-Lite0, against a plain loop over the same images: ``backbone(backbone.prepare(x))`` in
    batches, results kept in memory, no key and no write. The plain loop runs at each ``--plain-batches`` size
    (the cache fills in batches of ``runner.CPU_FEATURE_BATCH`` on the CPU, ``eval_batch_size`` on a GPU).
    Contenders alternate, medians over ``--rounds``. Target: the cache at least as fast as the plain forward
    at its best batch size. Then, at each batch size, the stages alone: ``prepare`` as it is, ``prepare`` as it
    was when the issue was filed (grey copied to 3 channels before an antialiased resize), and the network on
    prepared batches.

Usage
    .venv/bin/python benchmarks/feature_cache.py [--images 2000] [--rounds 3] [--cache-batch 32]
        [--plain-batches 32 64 128 256] [--threads 2]

Measure with nothing else running and say the load with the numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cl_bench.config import compose  # noqa: E402
from cl_bench.models.backbone import FeatureCache  # noqa: E402
from cl_bench.models.factory import create_backbone  # noqa: E402
from cl_bench.runner import CPU_FEATURE_BATCH, build_stream  # noqa: E402


@torch.no_grad()
def plain_rate(backbone, inputs: torch.Tensor, batch: int) -> float:
    backbone.eval()
    began = time.perf_counter()
    for start in range(0, len(inputs), batch):
        backbone(backbone.prepare(inputs[start:start + batch], "cpu")).float()
    return len(inputs) / (time.perf_counter() - began)


def prepare_before(backbone, images: torch.Tensor) -> torch.Tensor:
    """ImageBackbone.prepare as it was when issue 17 was filed: grey copied to 3 channels, then an antialiased
    resize of all three (also when enlarging)."""
    x = images.float().div_(255.0)
    x = x.mean(1, keepdim=True).expand(-1, backbone.preprocessing["in_chans"], -1, -1)
    size = backbone.preprocessing["image_size"]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - backbone.mean) / backbone.std


@torch.no_grad()
def stage_rates(backbone, inputs: torch.Tensor, batch: int) -> dict[str, float]:
    """Images per second of each stage alone: prepare now, prepare before, the network on prepared batches."""
    backbone.eval()
    parts = [inputs[start:start + batch] for start in range(0, len(inputs), batch)]
    rates = {}
    for name, stage in (("prepare", lambda part: backbone.prepare(part, "cpu")),
                        ("prepare before", lambda part: prepare_before(backbone, part))):
        began = time.perf_counter()
        for part in parts:
            stage(part)
        rates[name] = len(inputs) / (time.perf_counter() - began)
    prepared = [backbone.prepare(part, "cpu") for part in parts]
    began = time.perf_counter()
    for part in prepared:
        backbone(part)
    rates["network"] = len(inputs) / (time.perf_counter() - began)
    return rates


def cache_rate(backbone, samples, batch: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        cache = FeatureCache(directory, batch_size=batch, device="cpu")
        began = time.perf_counter()
        cache.encode(backbone, samples)
        return len(samples) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-batch", type=int, default=CPU_FEATURE_BATCH, help="the cache batch on the CPU")
    parser.add_argument("--plain-batches", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose(["scenario=fmnist", "progress=false"])
    stream = build_stream(cfg)
    samples = stream.tasks[0].train
    samples = samples.select(range(min(args.images, len(samples))))
    backbone = create_backbone(cfg.model, stream.input_kind, stream.input_shape)
    plain_rate(backbone, samples.inputs[:64], 64)  # warm-up, untimed
    cache, plain = [], {batch: [] for batch in args.plain_batches}
    for round_index in range(args.rounds):
        order = ["cache", *args.plain_batches]
        for contender in order if round_index % 2 == 0 else order[::-1]:
            if contender == "cache":
                cache.append(cache_rate(backbone, samples, args.cache_batch))
            else:
                plain[contender].append(plain_rate(backbone, samples.inputs, contender))
    print(f"{len(samples)} Fashion-MNIST images through frozen {cfg.model.name}, {args.threads} threads, "
          f"{args.rounds} rounds (medians)")
    best = max(plain, key=lambda batch: statistics.median(plain[batch]))
    for batch, rates in plain.items():
        print(f"plain forward, batch {batch:<4} {statistics.median(rates):8.1f} images/s")
    for batch in args.plain_batches:
        stages = [stage_rates(backbone, samples.inputs, batch) for _ in range(args.rounds)]
        print(f"stages alone, batch {batch:<4} " + "  ".join(
            f"{name} {statistics.median(rates[name] for rates in stages):8.1f}" for name in stages[0]) + " images/s")
    ours = statistics.median(cache)
    print(f"feature cache, batch {args.cache_batch:<4} {ours:8.1f} images/s  "
          f"ratio to the best plain forward (batch {best}): {ours / statistics.median(plain[best]):.3f}  target >= 1")


if __name__ == "__main__":
    main()
