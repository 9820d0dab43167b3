"""How much a result depends on the CPU thread count, against how much it depends on the seed.

    python scripts/thread_spread.py [--preset tiny|small] [--seeds 3] [--threads 1 2] [--deterministic] [--runs-dir runs/threads]

For each seed and thread count: the synthetic source model (configs/pretrain/synth_market.yaml) and its
adaptation (configs/uda/synth_market2synth_duke.yaml), each in its own process with OMP_NUM_THREADS set;
finished runs are skipped. Prints the last epoch's target mAP per run, the seed spread (sample std over
seeds, per thread count) and the thread spread (per seed, the largest minus the smallest over thread
counts). CPU reductions (convolutions, matrix products, sums) split their work by thread, so the same
seed gives other floating-point results with another thread count, and training amplifies them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from uda.cli import output_folder, positive_int, run_main  # noqa: E402
from uda.grid import Run, run_stage  # noqa: E402
from uda.report import collect  # noqa: E402
from uda.runlog import FINAL_MODEL  # noqa: E402

TINY = ["data.synth_preset=tiny", "data.num_pids=4", "data.num_workers=0", "eval.batch_size=64"]
TINY_ADAPT = ["optim.epochs=5", "optim.milestones=[10]", "adapt.iters=20", "cluster.k1=8", "cluster.k2=3", "cluster.min_samples=3"]


def stage(script: str, argv: list[str], threads: int, folder: Path) -> None:
    """One stage in its own process with OMP_NUM_THREADS = threads, as the grid runs one (skipped when
    done, resumed when cut)."""
    run = Run(script, folder, [*argv, "--output-dir", str(folder)], str(folder), threads=threads)
    if not run.done:
        run_stage(run, progress=lambda line: None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--deterministic", action="store_true", help="deterministic=true in both stages")
    parser.add_argument("--runs-dir", type=output_folder, default=Path("runs/threads"))
    args = parser.parse_args(argv)
    common = [f"data.synth_preset={args.preset}", "device=cpu"] + (TINY if args.preset == "tiny" else [])
    common += ["deterministic=true"] if args.deterministic else []
    pretrain_extra = ["optim.epochs=12", "optim.warmup_epochs=2", "optim.milestones=[20]", "train.eval_every=12"] if args.preset == "tiny" else []
    adapt_extra = TINY_ADAPT if args.preset == "tiny" else []
    tag = f"{args.preset}{'_det' if args.deterministic else ''}"
    table: dict[int, dict[int, float]] = {}
    for seed in range(args.seeds):
        for threads in args.threads:
            base = args.runs_dir.absolute() / tag / f"threads{threads}" / f"seed{seed}"
            stage("pretrain", ["--config", "configs/pretrain/synth_market.yaml", "--source", "synth_market", "--target", "synth_duke",
                                  "--opts", *common, *pretrain_extra, f"seed={seed}"], threads, base / "source")
            stage("adapt", ["--config", "configs/uda/synth_market2synth_duke.yaml", "--source", "synth_market", "--target", "synth_duke",
                               "--init", str(base / "source" / FINAL_MODEL), "--opts", *common, *adapt_extra, f"seed={seed}"], threads, base / "adapt")
            table.setdefault(seed, {})[threads] = collect(base / "adapt", "synth_duke")["adapted"]["mAP"]
            print(f"seed {seed} threads {threads}: adapted mAP {100 * table[seed][threads]:.1f}", flush=True)
    print(f"\n{args.preset} preset{', deterministic=true' if args.deterministic else ''}: last-epoch target mAP (%)")
    print("| seed | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in args.threads) + " | thread spread |")
    print("|---|" + "---|" * (len(args.threads) + 1))
    for seed, row in table.items():
        values = [row[t] for t in args.threads]
        print(f"| {seed} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {100 * (max(values) - min(values)):.1f} |")
    stds = [np.std([table[s][t] for s in table], ddof=1) if len(table) > 1 else 0.0 for t in args.threads]
    print("| seed spread (std) | " + " | ".join(f"{100 * v:.1f}" for v in stds) + " | |")


if __name__ == "__main__":
    run_main(main)  # a failed stage: its last lines, not a traceback
