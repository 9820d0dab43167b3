"""Time a training step (forward + backward) of a saved model on the CPU with subnormal floats kept
(IEEE default) and flushed to zero (torch.set_flush_denormal, what the stages set since this script).

    python scripts/bench_denormal.py --checkpoint runs/pretrain/market_cpu/last.pth [--batch 64] [--steps 4] [--repeats 3]

Why: late in a from-scratch CPU run, weight decay shrinks the weights of channels that no longer get a
gradient towards zero until they are subnormal (< 1.2e-38), and x86 arithmetic on subnormals is many
times slower. The epochs of configs/pretrain/market_cpu.yaml grew from 20 s to 150 s this way.
Prints how many of the model's weights are subnormal and the median step time in both modes. Each mode
runs in its own processes, alternating (torch's worker threads take the setting only at their start).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from uda import build, checkpoint  # noqa: E402
from uda.config import load_config  # noqa: E402


def subnormal_count(tensor: torch.Tensor) -> int:
    return int(((tensor != 0) & (tensor.abs() < torch.finfo(tensor.dtype).tiny)).sum())


def time_steps(checkpoint_path: Path, batch: int, steps: int) -> None:
    """Child process: median ms of a forward + backward of the checkpoint's model (printed last)."""
    torch.manual_seed(0)
    saved = checkpoint.read(checkpoint_path)
    cfg = load_config(saved[checkpoint.CONFIG])  # the run's own model and image size
    model = build.build_reid_model(cfg, pretrained="none")
    build.load_model_weights(model, saved, checkpoint_path)
    weights = [p.detach() for p in model.parameters()]
    total = sum(w.numel() for w in weights)
    subnormal = sum(subnormal_count(w) for w in weights)
    print(f"{checkpoint_path}: {subnormal:,} of {total:,} weights subnormal ({subnormal / total:.1%}), "
          f"{cfg.model.backbone} at {cfg.data.height}x{cfg.data.width}, batch {batch}, {torch.get_num_threads()} threads")
    images = torch.randn(batch, 3, cfg.data.height, cfg.data.width)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        out = model(images)
        (out["global"].square().mean() + out["bn"].square().mean()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(1000 * statistics.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run's last.pth or model_final.pth")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--repeats", type=int, default=3, help="processes per mode, the modes alternating")
    parser.add_argument("--child", choices=["kept", "flushed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_flush_denormal(args.child == "flushed")  # before any tensor work: worker threads inherit it
        time_steps(args.checkpoint, args.batch, args.steps)
        return
    times: dict[str, list[float]] = {"kept": [], "flushed": []}
    for repeat in range(args.repeats):
        for mode in times:
            out = subprocess.run([sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--child", mode], capture_output=True, text=True, check=True).stdout
            if repeat == 0 and mode == "kept":
                print(out.splitlines()[0])
            times[mode].append(float(out.split()[-1]))
    kept, flushed = statistics.median(times["kept"]), statistics.median(times["flushed"])
    print("| subnormals | ms per forward + backward (median) |\n|---|---|")
    print(f"| kept (IEEE default) | {kept:.0f} |\n| flushed to zero (build.set_backends) | {flushed:.0f} |")
    print(f"flushing is {kept / flushed:.1f}x faster")


if __name__ == "__main__":
    main()
