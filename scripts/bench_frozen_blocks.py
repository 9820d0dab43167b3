"""Images per second of the adaptation's training step with the backbone's first N blocks frozen
(model.frozen_blocks), MobileNetV2 at 128x64 as the *_mobilenet configs train it on a CPU: 64 source +
64 target images, two cosine heads, CE + triplet, Adam, channels_last, fp32. Random images already in
memory, so only the model's step is timed; the variants are timed in turns, round after round, so a
machine that slows down or speeds up during the run does so for all of them alike.

    python scripts/bench_frozen_blocks.py [--frozen 0 4 7 11 14] [--steps 5] [--rounds 3] [--height 128 --width 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from uda.losses import cross_entropy_label_smooth, triplet_loss  # noqa: E402
from uda.models import build_head, build_model  # noqa: E402
from uda.runlog import cpu_description  # noqa: E402


def make_step(frozen: int, height: int, width: int):
    torch.manual_seed(0)
    net = build_model("mobilenet_v2", "none", frozen_blocks=frozen).to(memory_format=torch.channels_last)
    heads = torch.nn.ModuleDict({name: build_head("cosine", net.feature_dim, 700, temperature=0.1) for name in ("source", "target")})
    optimizer = torch.optim.Adam(list(net.parameters()) + list(heads.parameters()), lr=3.5e-4)
    images = torch.randn(128, 3, height, width).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(128) // 4 % 700

    def step() -> None:
        out = net(images)
        loss = sum(cross_entropy_label_smooth(heads[name](out["bn"][rows], labels[rows]), labels[rows], 0.1)
                   + triplet_loss(out["global"][rows], labels[rows], 0.3)
                   for name, rows in (("source", slice(0, 64)), ("target", slice(64, None))))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # the first step allocates
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frozen", type=int, nargs="+", default=[0, 4, 7, 11, 14])
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    steps = {n: make_step(n, args.height, args.width) for n in args.frozen}
    seconds: dict[int, list[float]] = {n: [] for n in args.frozen}
    for _ in range(args.rounds):
        for n, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds[n].append((time.perf_counter() - start) / args.steps)
    print(f"machine: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"MobileNetV2 {args.height}x{args.width}, 128 images a step, median of {args.rounds} rounds of {args.steps} steps")
    print("| frozen blocks | s / step | images / s | vs none |\n|---|---|---|---|")
    base = statistics.median(seconds[args.frozen[0]])
    for n in args.frozen:
        median = statistics.median(seconds[n])
        print(f"| {n} | {median:.3f} | {128 / median:.0f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
