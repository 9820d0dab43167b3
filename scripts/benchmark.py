"""Every hot path side by side with the usual implementation, in one run, on the machine it runs on.

    python scripts/benchmark.py [--quick] [--full] [--device cpu|cuda] [--out DIR] [--only CASE ...]

Each measurement runs in a fresh process (its own peak memory, no warm caches from another; "+X GB
peak" is the step's peak resident memory above where it stood when the step began), on
synthetic data of the real sizes (real JPEGs for the input pipeline when $UDA_REAL_DATA names the
folder holding Market-1501). Writes DIR/benchmark.md (one table, headed by the machine line) and
DIR/benchmark.json. Every row is "usual | ours | ratio"; only ratios measured in one run on one machine
mean anything (our machines differ from session to session).

Cases (sizes: default / --quick; --full adds MSMT17's 126,441 for clustering):
  cluster    features -> Jaccard -> DBSCAN -> centres, N = 12,936 and 16,522 (dim 2048): SpCL-style
             dense (baselines/spcl_jaccard.py) vs ours; time and peak memory of the step
  evaluate   a Market-size test set (3,368 x 19,732): a per-query numpy loop (baselines/literal_metrics.py) vs ours
  rerank     k-reciprocal re-ranking: the published numpy algorithm (baselines/literal_rerank.py) vs ours
             at a size it does within a minute, and ours alone at Market size
  pipeline   training batches (P x K = 16 x 4, augmented) per second: per-image DataLoader vs device pipeline,
             on the CPU demo's synthetic images at 64x32 (and real Market JPEGs at 128x64 when there are some)
  train      one training step (64 images, forward + backward + Adam), images/s, per backbone of our
             configs: fp32 (usual) vs channels_last, and bf16 autocast / torch.compile on top of channels_last
  extract    feature extraction images/s (batch 128, eval mode), same backbones and modes, and BatchNorm folded
             into the convolutions on channels_last (what extract_features runs)
--quick (smallest sizes, under a minute on 2 cores) is CI's smoke test: it checks the table is complete.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from uda.cli import run_main  # noqa: E402
from uda.distributed import DistInfo, pick_device  # noqa: E402
from uda.errors import UdaError  # noqa: E402
from uda.runlog import cpu_description  # noqa: E402

# (backbone, height, width) of our configs: the recipe's ResNet-50, the CPU demo's, the ImageNet CPU one
BACKBONES = [("resnet50", 256, 128), ("resnet18_w16", 128, 64), ("mobilenet_v2", 128, 64)]
MODES = ("fp32", "channels_last", "bf16", "compile")
EXTRACT_MODES = (*MODES, "folded")  # folded: BatchNorm folded into the convolutions, as extract_features does
MODE_LABELS = {"channels_last": "channels_last", "bf16": "bf16 + channels_last", "compile": "compile + channels_last",
               "folded": "folded BN + channels_last"}


# ------------------------------------------------------------------ measurements (in the child process)


def _status_gb(field: str) -> float | None:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: the peak) in GB; None off Linux."""
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024 / 1e9


def _peak_rss_gb() -> float:
    peak = _status_gb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _memory_mark() -> float:
    """What a step's peak memory is counted from (GB): the resident memory now, with the kernel's peak mark
    reset to it (Linux's /proc/self/clear_refs), so that set-up which peaked higher (making the synthetic
    features) does not hide the step's own peak; where that is refused, the peak so far (the step then
    counts only as far as it raises the process's peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return _peak_rss_gb()
    now = _status_gb("VmRSS")
    return now if now is not None else _peak_rss_gb()


def measure_cluster(variant: str, n: int, dim: int, device: str) -> dict:
    from bench_cluster import synthetic_reid_features

    from uda.cluster import cluster_centers, jaccard_distance, pseudo_labels

    features, _ = synthetic_reid_features(n, dim, seed=0)
    if variant == "usual":
        from sklearn.cluster import DBSCAN

        from baselines.spcl_jaccard import compute_jaccard_distance
    rss_before = _memory_mark()
    start = time.perf_counter()
    if variant == "ours":
        features = features.to(device)
        labels = pseudo_labels(jaccard_distance(features, 30, 6, device=torch.device(device), max_distance=0.6), eps=0.6, min_samples=4)
        cluster_centers(features, labels)
        if device == "cuda":
            torch.cuda.synchronize()
    else:
        labels = DBSCAN(eps=0.6, min_samples=4, metric="precomputed", n_jobs=-1).fit_predict(compute_jaccard_distance(features, 30, 6))
        cluster_centers(features, labels)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gb": _peak_rss_gb(), "step_gb": _peak_rss_gb() - rss_before, "clusters": int(np.max(labels)) + 1}


def _test_set(num_query: int, num_gallery: int, dim: int = 256):
    from bench_rerank import clustered_features

    gen = np.random.default_rng(0)
    features = clustered_features(num_query + num_gallery, dim, 0, torch.device("cpu"))
    qf, gf = features[:num_query], features[num_query:]
    ids = np.arange(num_query + num_gallery) % max(1, (num_query + num_gallery) // 28)
    cams = gen.integers(0, 6, num_query + num_gallery)
    return qf, gf, ids[:num_query], ids[num_query:], cams[:num_query], cams[num_query:]


def measure_evaluate(variant: str, num_query: int, num_gallery: int) -> dict:
    from baselines.literal_metrics import literal_evaluate
    from uda.evaluation.metrics import evaluate

    qf, gf, qp, gp, qc, gc = _test_set(num_query, num_gallery)
    distmat = 1 - qf @ gf.T
    start = time.perf_counter()
    if variant == "ours":
        result = evaluate(distmat, torch.as_tensor(qp), torch.as_tensor(gp), torch.as_tensor(qc), torch.as_tensor(gc))
    else:
        result = literal_evaluate(distmat.numpy(), qp, gp, qc, gc)
    return {"seconds": time.perf_counter() - start, "mAP": float(result["mAP"])}


def measure_rerank(variant: str, num_query: int, num_gallery: int, device: str) -> dict:
    from bench_rerank import euclidean

    from baselines.literal_rerank import re_ranking_literal
    from uda.evaluation.rerank import re_ranking

    qf, gf, *_ = _test_set(num_query, num_gallery)
    q_g, q_q, g_g = euclidean(qf, gf), euclidean(qf, qf), euclidean(gf, gf)
    rss_before = _memory_mark()
    start = time.perf_counter()
    if variant == "ours":
        out = re_ranking(torch.from_numpy(q_g), torch.from_numpy(q_q), torch.from_numpy(g_g), k1=20, k2=6, lambda_value=0.3,
                         device=torch.device(device))
        out = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
    else:
        out = re_ranking_literal(q_g, q_q, g_g, 20, 6, 0.3)
    return {"seconds": time.perf_counter() - start, "peak_gb": _peak_rss_gb(), "step_gb": _peak_rss_gb() - rss_before,
            "checksum": float(np.asarray(out, dtype=np.float64)[:4, :4].sum())}


def measure_pipeline(variant: str, num_ids: int, epochs: int, preset: str, device: str, real: bool, height: int, width: int) -> dict:
    from uda import pretrain
    from uda.data import splits
    from uda.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        name, root = ("market", os.environ["UDA_REAL_DATA"]) if real else ("synth_market", tmp)
        cfg = load_config(pretrain.DEFAULTS, None, [
            f"data.pipeline={'loader' if variant == 'usual' else 'device'}", f"data.height={height}", f"data.width={width}", f"data.root={root}",
            f"data.num_workers={os.cpu_count()}", f"device={device}", f"data.synth_preset={preset}", f"data.subset_ids={num_ids}"])
        dataset = splits.load_named_dataset(name, cfg, "source")
        start = time.perf_counter()
        records, images = splits.prepare_train_split(dataset.train, cfg, torch.device(device))
        setup = time.perf_counter() - start
        loader = splits.make_train_loader(records, cfg, images)
        count, start = 0, time.perf_counter()
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                count += batch[0].shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return {"images_per_s": count / (time.perf_counter() - start), "setup_s": setup,
                "data": f"{name} ({len(records)} train images{'' if real else ', synthetic ' + preset})"}


def _model(backbone: str, mode: str, device: str, train: bool):
    from uda.models import build_head, build_model

    torch.manual_seed(0)
    net = build_model(backbone, "none", 1, "avg", True).to(device)
    if mode != "fp32":
        net = net.to(memory_format=torch.channels_last)
    net.train(train)
    head = build_head("cosine", net.feature_dim, 16, temperature=0.1).to(device)
    return (torch.compile(net) if mode == "compile" else net), head


def measure_train(backbone: str, height: int, width: int, mode: str, steps: int, device: str) -> dict:
    from uda.losses import cross_entropy_label_smooth, triplet_loss

    net, head = _model(backbone, mode, device, train=True)
    optimizer = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=3.5e-4)
    images = torch.randn(64, 3, height, width, device=device)
    if mode != "fp32":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(64, device=device) // 4

    def step() -> float:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            out = net(images)
            loss = cross_entropy_label_smooth(head(out["bn"], labels).float(), labels, 0.1) + triplet_loss(out["global"].float(), labels, 0.3, False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    start = time.perf_counter()
    step()  # the first step pays for compilation and allocations
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"images_per_s": 64 * steps / (time.perf_counter() - start), "first_step_s": warm}


@torch.no_grad()
def measure_extract(backbone: str, height: int, width: int, mode: str, batches: int, device: str) -> dict:
    from uda.evaluation import fold_batchnorm

    net, _ = _model(backbone, mode, device, train=False)
    if mode == "folded":
        net = fold_batchnorm(net)
    images = torch.randn(128, 3, height, width, device=device)
    if mode != "fp32":
        images = images.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            net(images).float().sum().item()

    start = time.perf_counter()
    forward()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        forward()
    return {"images_per_s": 128 * batches / (time.perf_counter() - start), "first_batch_s": warm}


MEASURES = {"cluster": measure_cluster, "evaluate": measure_evaluate, "rerank": measure_rerank,
            "pipeline": measure_pipeline, "train": measure_train, "extract": measure_extract}


# ------------------------------------------------------------------------------- the plan (parent)


def plan(quick: bool, full: bool, device: str) -> list[dict]:
    """Rows of measurements: {case, size, usual: (function, kwargs) | None, ours: (function, kwargs), unit}."""
    rows = []
    cluster_sizes = [(1500, 128)] if quick else [(12936, 2048), (16522, 2048)] + ([(126441, 2048)] if full else [])
    for n, dim in cluster_sizes:
        usual = ("cluster", {"variant": "usual", "n": n, "dim": dim, "device": "cpu"}) if n <= 20000 else None  # dense N x N: 160 GB at 126k
        rows.append({"case": "cluster", "size": f"N = {n:,}, dim {dim}", "unit": "s", "usual": usual,
                     "ours": ("cluster", {"variant": "ours", "n": n, "dim": dim, "device": device})})
    q, g = (300, 2000) if quick else (3368, 19732)
    rows.append({"case": "evaluate", "size": f"{q:,} x {g:,}", "unit": "s", "usual": ("evaluate", {"variant": "usual", "num_query": q, "num_gallery": g}),
                 "ours": ("evaluate", {"variant": "ours", "num_query": q, "num_gallery": g})})
    q, g = (100, 400) if quick else (600, 2400)
    rows.append({"case": "rerank", "size": f"{q:,} x {g:,}", "unit": "s", "usual": ("rerank", {"variant": "usual", "num_query": q, "num_gallery": g, "device": "cpu"}),
                 "ours": ("rerank", {"variant": "ours", "num_query": q, "num_gallery": g, "device": device})})
    if not quick:
        rows.append({"case": "rerank", "size": "3,368 x 19,732 (Market)", "unit": "s", "usual": None,
                     "ours": ("rerank", {"variant": "ours", "num_query": 3368, "num_gallery": 19732, "device": device})})
    # the CPU demo's images (synthetic, 64x32), and real Market JPEGs at our ImageNet CPU configs' 128x64 when there are some
    sources = [(False, 64, 32, f"synthetic {'tiny' if quick else 'small'} (the CPU demo)")]
    sources += [(True, 128, 64, "Market-1501 JPEGs")] if os.environ.get("UDA_REAL_DATA") and not quick else []
    for real, height, width, what in sources:
        pipeline = {"num_ids": 16 if quick else 0, "epochs": 1 if quick else 2, "preset": "tiny" if quick else "small", "device": device,
                    "real": real, "height": height, "width": width}
        rows.append({"case": "pipeline", "size": f"{height}x{width}, P x K = 16 x 4, {what}", "unit": "images/s",
                     "usual": ("pipeline", {"variant": "usual", **pipeline}), "ours": ("pipeline", {"variant": "ours", **pipeline})})
    backbones = [("resnet18_w16", 64, 32)] if quick else BACKBONES
    for case, count in (("train", 1 if quick else 3), ("extract", 1 if quick else 4)):
        key = "steps" if case == "train" else "batches"
        modes = (MODES if case == "train" else EXTRACT_MODES)[1:]
        modes = [mode for mode in modes if mode != "compile"] if quick else modes  # compiling takes minutes
        for backbone, height, width in backbones:
            usual = (case, {"backbone": backbone, "height": height, "width": width, "mode": "fp32", key: count, "device": device})
            for mode in modes:
                rows.append({"case": case, "size": f"{backbone} {height}x{width}, {MODE_LABELS[mode]} vs fp32", "unit": "images/s", "usual": usual,
                             "ours": (case, {**usual[1], "mode": mode})})
    return rows


def run_child(measure: tuple[str, dict], timeout: float) -> dict:
    """One measurement in a fresh process; {"error": ...} when it fails (e.g. torch.compile without a compiler)."""
    name, kwargs = measure
    command = [sys.executable, __file__, "--child", json.dumps({"measure": name, "kwargs": kwargs})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def headline(result: dict, unit: str) -> float | None:
    return result.get("seconds") if unit == "s" else result.get("images_per_s")


def ratio(usual: dict | None, ours: dict, unit: str) -> str:
    """How many times better ours is: usual time / our time, or our images/s / usual images/s."""
    a, b = (headline(usual, unit) if usual else None), headline(ours, unit)
    if a is None or b is None or not a or not b:
        return "-"
    return f"{a / b:.1f}x" if unit == "s" else f"{b / a:.2f}x"


def cell(result: dict | None, unit: str) -> str:
    if result is None:
        return "-"
    if "error" in result:
        return f"failed: {result['error']}"
    value = headline(result, unit)
    text = f"{value:.3g} s" if unit == "s" else f"{value:.0f} img/s"
    if "step_gb" in result:
        text += f", +{result['step_gb']:.2f} GB peak"
    return text


def machine() -> dict:
    try:
        ram = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))) / 2**20
    except (OSError, StopIteration):
        ram = 0.0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or "unknown"
    return {"cpu": cpu_description(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "ram_gb": round(ram, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit}


def machine_line(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['ram_gb']} GB RAM, "
            f"GPU {m['gpu']}, torch {m['torch']}, {m['date']}, commit {m['commit']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smallest sizes (CI's smoke test)")
    parser.add_argument("--full", action="store_true", help="also cluster MSMT17's 126,441")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--only", nargs="+", choices=sorted(MEASURES), help="these cases only")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one measurement may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(MEASURES[spec["measure"]](**spec["kwargs"])))
        return {}
    pick_device(DistInfo(), args.device)  # a misspelt or absent device: one line now, not a child's traceback per row
    if not args.timeout > 0:
        raise UdaError(f"--timeout must be > 0 seconds, got {args.timeout}")
    try:  # before the minutes of measuring whose table it will hold
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UdaError(f"cannot make the output folder {args.out}: {exc.strerror}") from None
    m = machine()
    rows = [r for r in plan(args.quick, args.full, args.device) if not args.only or r["case"] in args.only]
    lines = [f"Machine: {machine_line(m)}. Device: {args.device}." + (" --quick sizes: timings are not meaningful." if args.quick else ""), "",
             "| case | size | usual | ours | ours vs usual |", "|---|---|---|---|---|"]
    measured: dict[str, dict] = {}  # one fp32 measurement serves every mode row of its backbone

    def result_of(measure: tuple[str, dict] | None) -> dict | None:
        if measure is None:
            return None
        key = json.dumps(measure, sort_keys=True)
        if key not in measured:
            measured[key] = run_child(measure, args.timeout)
        return measured[key]

    for row in rows:
        usual, ours = result_of(row["usual"]), result_of(row["ours"])
        row["usual_result"], row["ours_result"] = usual, ours
        lines.append(f"| {row['case']} | {row['size']} | {cell(usual, row['unit'])} | {cell(ours, row['unit'])} | {ratio(usual, ours, row['unit'])} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    (args.out / "benchmark.md").write_text(table)
    report = {"machine": m, "device": args.device, "quick": args.quick,
              "rows": [{k: v for k, v in r.items() if k not in ("usual", "ours")} | {"usual": r["usual"], "ours": r["ours"]} for r in rows]}
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{table}\nwrote {args.out / 'benchmark.md'} and benchmark.json")
    return report


if __name__ == "__main__":
    run_main(main)
