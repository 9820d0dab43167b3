"""Benchmark the clustering step (features -> Jaccard -> DBSCAN -> centres): ours vs the SpCL-style one.

    python scripts/bench_cluster.py --n 16522 --dim 2048 [--device cpu|cuda] [--variants ours,spcl]

Features are synthetic but clustered like re-ID features of a target train set (DukeMTMC-reID: 16,522
images of 702 people): about 23.5 images per identity, a bias shared by everyone seen by one of 8
cameras, per-image noise of varying strength and 5% distractors, L2-normalised, generated from a seed.
Each variant runs in a fresh subprocess so that its peak memory is its own; printed: one markdown
table and one JSON line.
Ours keeps only the Jaccard pairs within eps (max_distance=eps: DBSCAN sees the same neighbourhoods);
SpCL's runs DBSCAN on its dense matrix, as SpCL does. Both variants must find the same clusters.
Memory columns: "peak RSS" is the child's ru_maxrss (torch alone is about 0.5 GB of it), "step RSS" is
the peak during the clustering step minus the resident size just before it (features already made).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from uda.cluster import cluster_centers, jaccard_distance, pseudo_labels  # noqa: E402
SPCL_MAX_GB = 20.0


def synthetic_reid_features(num: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 L2-normalised features and (N,) int64 identities (-1 for distractors)."""
    gen = torch.Generator().manual_seed(seed)
    num_ids, num_cams = max(1, round(num / 23.5)), 8
    ids = torch.randint(0, num_ids, (num,), generator=gen)
    ids[torch.rand(num, generator=gen) < 0.05] = -1
    cams = torch.randint(0, num_cams, (num,), generator=gen)
    centres = F.normalize(torch.randn(num_ids, dim, generator=gen), dim=1)
    camera_bias = 0.3 * F.normalize(torch.randn(num_cams, dim, generator=gen), dim=1)
    features = torch.empty(num, dim)
    for start in range(0, num, 4096):  # in chunks, so that making the features stays small
        end = min(start + 4096, num)
        pid = ids[start:end]
        noise_scale = 0.8 + 0.6 * torch.rand(end - start, 1, generator=gen) + 2.0 * (pid < 0)[:, None]
        noise = torch.randn(end - start, dim, generator=gen) / dim**0.5
        centre = centres[pid.clamp(min=0)] * (pid >= 0)[:, None]
        features[start:end] = centre + camera_bias[cams[start:end]] + noise_scale * noise
    return F.normalize(features, dim=1), ids


def _resident_gb(field: str) -> float:
    """VmRSS or VmHWM of this process in GB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(args: argparse.Namespace) -> dict:
    """Inside the child: make the features, time the clustering step, report memory."""
    if args.variant == "spcl":  # imported before the clock starts, and only where it is used (faiss)
        from baselines.spcl_jaccard import compute_jaccard_distance
    torch.manual_seed(args.seed)
    features, _ = synthetic_reid_features(args.n, args.dim, args.seed)
    device = torch.device(args.device)
    if args.variant == "ours":
        features = features.to(device)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: peak of the step alone
    rss_before = _resident_gb("VmRSS")
    if device.type == "cuda":  # start CUDA and cuBLAS before the clock, as a training process has
        (features[:8] @ features[:8].T).sum().item()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    parts = {}
    start = time.perf_counter()
    if args.variant == "ours":
        dist = jaccard_distance(features, args.k1, args.k2, device=device, max_distance=args.eps)
        parts["jaccard_s"] = time.perf_counter() - start
        labels = pseudo_labels(dist, eps=args.eps, min_samples=args.min_samples)
        parts["dbscan_s"] = time.perf_counter() - start - parts["jaccard_s"]
        centres = cluster_centers(features, labels)
    else:
        dist = compute_jaccard_distance(features, args.k1, args.k2)
        parts["jaccard_s"] = time.perf_counter() - start
        labels = DBSCAN(eps=args.eps, min_samples=args.min_samples, metric="precomputed", n_jobs=-1).fit_predict(dist)
        parts["dbscan_s"] = time.perf_counter() - start - parts["jaccard_s"]
        members: dict[int, list[torch.Tensor]] = {}  # SpCL's generate_cluster_features, as a loop
        for index, label in enumerate(labels.tolist()):
            if label >= 0:
                members.setdefault(label, []).append(features[index])
        centres = torch.stack([torch.stack(members[c]).mean(0) for c in sorted(members)])
        centres = F.normalize(centres, dim=1)
        labels = np.asarray(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    parts["centres_s"] = seconds - parts["jaccard_s"] - parts["dbscan_s"]
    return {
        "variant": args.variant,
        "device": str(device) if args.variant == "ours" else "cpu",
        "n": args.n,
        "dim": args.dim,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        **{k: round(v, 3) for k, v in parts.items()},
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "step_rss_gb": _resident_gb("VmHWM") - rss_before,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0,
        "num_clusters": int(labels.max()) + 1,
        "num_centres": int(centres.shape[0]),
        "outlier_fraction": float((labels < 0).mean()),
    }


def spcl_memory_gb(num: int) -> float:
    """Rough peak of the dense SpCL-style step: V, its query expansion and the Jaccard matrix, N x N float32."""
    return 2.5 * num * num * 4 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16522)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="ours,spcl")
    parser.add_argument("--k1", type=int, default=30)
    parser.add_argument("--k2", type=int, default=6)
    parser.add_argument("--eps", type=float, default=0.6)
    parser.add_argument("--min-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads of each child (OMP_NUM_THREADS); default: all")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = []
    for variant in args.variants.split(","):
        if variant == "spcl" and spcl_memory_gb(args.n) > SPCL_MAX_GB:
            need = spcl_memory_gb(args.n)
            print(f"skipping spcl at N={args.n}: its dense N x N matrices need ~{need:.0f} GB (> {SPCL_MAX_GB:.0f})")
            continue
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        child = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        if child.returncode != 0:
            sys.exit(f"variant {variant} failed:\n{child.stderr}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))

    columns = ["variant", "device", "threads", "N", "seconds", "Jaccard s", "DBSCAN s", "centres s"]
    columns += ["peak RSS GB", "step RSS GB", "peak GPU GB", "clusters"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in results:
        numbers = [r["seconds"], r["jaccard_s"], r["dbscan_s"], r["centres_s"]]
        numbers += [r["peak_rss_gb"], r["step_rss_gb"], r["peak_gpu_gb"]]
        cells = [r["variant"], r["device"], str(r["threads"]), str(r["n"])]
        cells += [f"{x:.2f}" for x in numbers] + [str(r["num_clusters"])]
        print("| " + " | ".join(cells) + " |")
    if len({r["num_clusters"] for r in results}) > 1:
        print("WARNING: the variants found different numbers of clusters")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
