"""Time one training step of the UDA stage (ResNet-50, last stride 1, 64 source + 64 target images at
256x128, two cosine heads, CE + triplet, Adam, bf16 autocast, channels_last) in a few variants, on random
images already on the device, so only the model's step is timed (not the data pipeline).

    python scripts/bench_train_step.py [--device cuda] [--steps 40] [--variants sync,nosync,compile]

sync: the engine's loop (loss values read back every step); nosync: losses kept on the device;
compile: nosync with torch.compile(backbone).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from uda.losses import cross_entropy_label_smooth, triplet_loss  # noqa: E402
from uda.models import build_head, build_model  # noqa: E402


def step_fn(net, heads, optimizer, images, labels, device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = net(images)
            losses = []
            for name, rows in (("source", slice(0, 64)), ("target", slice(64, None))):
                logits = heads[name](out["bn"][rows], labels[rows])
                losses.append(cross_entropy_label_smooth(logits.float(), labels[rows], 0.1))
                losses.append(triplet_loss(out["global"][rows], labels[rows], 0.3, False))
        total = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.detach()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", default="sync,nosync,compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        net = build_model("resnet50", "none", 1, "avg", True).to(device).to(memory_format=torch.channels_last)
        heads = torch.nn.ModuleDict({"source": build_head("cosine", 2048, 751, temperature=0.1),
                                     "target": build_head("cosine", 2048, 700, temperature=0.1)}).to(device)
        optimizer = torch.optim.Adam(list(net.parameters()) + list(heads.parameters()), lr=3.5e-4)
        net.train()
        model = torch.compile(net) if variant == "compile" else net
        images = torch.randn(128, 3, 256, 128, device=device).contiguous(memory_format=torch.channels_last)
        labels = torch.arange(128, device=device) // 4 % 700
        step = step_fn(model, heads, optimizer, images, labels, device)
        start = time.perf_counter()
        for _ in range(5):
            step().item()
        warm = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sums = []
        for _ in range(args.steps):
            loss = step()
            if variant == "sync":
                loss.item()
            else:
                sums.append(loss)
        if sums:
            torch.stack(sums).sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        print(f"{variant:8s} {seconds * 1000:7.1f} ms/step  {128 / seconds:7.0f} img/s  (first 5 steps {warm:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
