"""The results table of a UDA experiment, read back from run folders: direct transfer (the source model
on the target, epoch 0 of the adaptation run), adapted (the adaptation run's LAST epoch) and, when
given, the target-supervised oracle (a pretrain run on the target's labels).

    python -m uda.report --adapt runs/adapt/market2duke --target duke [--oracle DIR] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from uda.cli import output_file, run_main
from uda.errors import UdaError
from uda.runlog import read_metrics

COLUMNS = ("mAP", "rank1", "rank5", "rank10")


def evaluation(run_dir: Path, set_name: str, which: str) -> dict | None:
    """The first or last evaluation of one test set in a run folder's metrics.jsonl (None: never evaluated)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UdaError(f"{path} does not exist: run the stage first (see scripts/)")
    records = [r for r in read_metrics(path) if set_name in r]
    if not records:
        return None
    record = records[0] if which == "first" else records[-1]
    return {"epoch": record["epoch"], **{k: record[set_name][k] for k in COLUMNS}}


def collect(adapt_dir: Path, target: str, oracle_dir: Path | None = None) -> dict:
    """{"direct": {...}, "adapted": {...}, "oracle": {...}}, plus "*_rerank" rows when re-ranking was evaluated."""
    results = {}
    for suffix in ("", "_rerank"):
        rows = {"direct": evaluation(adapt_dir, target + suffix, "first"), "adapted": evaluation(adapt_dir, target + suffix, "last")}
        if oracle_dir is not None:
            rows["oracle"] = evaluation(oracle_dir, target + suffix, "last")
        results.update({f"{name}{suffix}": row for name, row in rows.items() if row is not None})
    if "direct" not in results or results["direct"]["epoch"] != 0:
        raise UdaError(f"{adapt_dir} has no epoch-0 (direct transfer) evaluation of '{target}' "
                       f"(it evaluated {evaluated_sets(adapt_dir)}): an adapt.py run's folder and its --target")
    if oracle_dir is not None and "oracle" not in results:
        raise UdaError(f"{oracle_dir} has no evaluation of '{target}' (it evaluated {evaluated_sets(oracle_dir)}): "
                       f"the oracle is a pretrain.py run on the target's labels (--source {target})")
    return results


def evaluated_sets(run_dir: Path) -> str:
    """The test sets a run folder's metrics.jsonl holds, for an error message."""
    names = sorted({name for record in read_metrics(Path(run_dir) / "metrics.jsonl") for name in record if name != "epoch"})
    return ", ".join(names) or "none"


def markdown_table(results: dict, title: str) -> str:
    """One row per result ("<name>_rerank" shown as "<name> + re-ranking"), percentages."""
    lines = [f"| {title} | mAP | rank-1 | rank-5 | rank-10 |", "|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name.replace('_rerank', ' + re-ranking')} | " + " | ".join(f"{100 * row[k]:.1f}" for k in COLUMNS) + " |")
    return "\n".join(lines)


def publish(results: dict, title: str, json_path: Path | None) -> None:
    """Print the table; with json_path also write the results there (the CLIs' shared ending)."""
    print(markdown_table(results, title))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapt", required=True, type=Path, help="run folder of uda/adapt.py")
    parser.add_argument("--target", required=True, help="target dataset name as evaluated (e.g. duke)")
    parser.add_argument("--oracle", type=Path, help="run folder of a pretrain run on the target's labels")
    parser.add_argument("--json", type=output_file(".json"), help="also write the results here")
    args = parser.parse_args(argv)
    results = collect(args.adapt, args.target, args.oracle)
    publish(results, f"{args.target} (target test)", args.json)
    return results


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
