"""Time k-reciprocal re-ranking on Market-1501-sized random features (3,368 queries, 19,732 gallery).

    python scripts/bench_rerank.py --q 3368 --g 19732 --dim 2048 [--device cpu|cuda] [--literal]

The features are random but clustered (about 28 images per identity, as in Market's test set) and
L2-normalised; the distances handed to `re_ranking` are Euclidean numpy float32 matrices, as the
evaluator passes them. --literal also runs the authors' algorithm (baselines/literal_rerank.py, dense
and slow: only when Q + G <= 4000) and reports the largest difference. Prints a markdown table and a
JSON line.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.literal_rerank import re_ranking_literal  # noqa: E402
from uda.evaluation.rerank import re_ranking  # noqa: E402

LITERAL_MAX_POINTS = 4000


def clustered_features(num: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """(num, dim) L2-normalised features, about 28 per random identity centre."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, num // 28), dim, generator=gen), dim=1)
    ids = torch.randint(0, centres.shape[0], (num,), generator=gen)
    features = centres[ids] + torch.randn(num, dim, generator=gen) / dim**0.5
    return F.normalize(features, dim=1).to(device)


def euclidean(a: torch.Tensor, b: torch.Tensor, chunk_size: int = 4096) -> np.ndarray:
    """(len(a), len(b)) float32 Euclidean distances of unit vectors, in row chunks, on the host."""
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for start in range(0, a.shape[0], chunk_size):
        sims = a[start : start + chunk_size] @ b.T
        out[start : start + chunk_size] = (2 - 2 * sims).clamp_(min=0).sqrt_().cpu().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--q", type=int, default=3368)
    parser.add_argument("--g", type=int, default=19732)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k1", type=int, default=20)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--lambda-value", type=float, default=0.3)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: by device)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--literal", action="store_true", help="also run the slow literal algorithm (small sizes only)")
    args = parser.parse_args()

    device = torch.device(args.device)
    features = clustered_features(args.q + args.g, args.dim, args.seed, device)
    query, gallery = features[: args.q], features[args.q :]
    q_g, q_q, g_g = euclidean(query, gallery), euclidean(query, query), euclidean(gallery, gallery)
    del features, query, gallery

    if device.type == "cuda":  # CUDA is already started: the distances above were computed there
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ours = re_ranking(q_g, q_q, g_g, args.k1, args.k2, args.lambda_value, device=device, chunk_size=args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    results = [
        {
            "variant": "ours",
            "device": str(device),
            "q": args.q,
            "g": args.g,
            "seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0,
        }
    ]

    if args.literal and args.q + args.g > LITERAL_MAX_POINTS:
        print(f"skipping the literal algorithm: Q + G = {args.q + args.g} > {LITERAL_MAX_POINTS} (dense, Python loops)")
    elif args.literal:
        start = time.perf_counter()
        literal = re_ranking_literal(q_g, q_q, g_g, args.k1, args.k2, args.lambda_value)
        results.append(
            {
                "variant": "literal",
                "device": "cpu",
                "q": args.q,
                "g": args.g,
                "seconds": time.perf_counter() - start,
                "max_abs_diff": float(np.abs(literal - ours).max()),
            }
        )

    print("| variant | device | Q | G | seconds | peak RSS GB | peak GPU GB | max abs diff vs ours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rss = f"{r['peak_rss_gb']:.2f}" if "peak_rss_gb" in r else "-"
        gpu = f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else "-"
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
        print(f"| {r['variant']} | {r['device']} | {r['q']} | {r['g']} | {r['seconds']:.2f} | {rss} | {gpu} | {diff} |")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
