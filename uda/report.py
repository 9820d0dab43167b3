"""The results table of a UDA experiment, read back from run folders: direct transfer (the source model
on the target, epoch 0 of the adaptation run), adapted (the adaptation run's LAST epoch) and, when
given, the target-supervised oracle (a pretrain run on the target's labels).

    python -m uda.report --adapt runs/adapt/market2duke --target duke [--oracle DIR] [--json results.json] [--allow-partial]

A run that has not finished (its last evaluation before its config's optim.epochs, or no model_final.pth)
is refused: its last evaluation is not the result. --allow-partial shows it, marked UNFINISHED.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from uda.cli import output_file, run_main
from uda.config import read_yaml
from uda.errors import UdaError
from uda.runlog import FINAL_MODEL, read_metrics

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


def unfinished(run_dir: Path, epoch: int) -> str | None:
    """Why a run whose last evaluation is `epoch` has not finished ("epoch 1 of 3"), or None: its config.yaml's
    optim.epochs not reached, or no model_final.pth (the run was cut, or is still going, after that epoch)."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    epochs = ((read_yaml(config, "run config") or {}).get("optim") or {}).get("epochs", "?") if config.is_file() else "?"
    missing = [name for name in ("config.yaml", FINAL_MODEL) if not (run_dir / name).is_file()]
    if epoch == epochs and not missing:
        return None
    return f"epoch {epoch} of {epochs}" + (f" (no {' or '.join(missing)})" if missing else "")


def check_finished(results: dict, runs: dict[str, Path | None], allow_partial: bool) -> None:
    """Refuse a row of an unfinished run (`runs`: row name -> its run folder; the direct row, epoch 0, is
    always there); with allow_partial, mark it ("unfinished": the reason) for the table and the JSON."""
    for name, row in results.items():
        run_dir = runs.get(name.removesuffix("_rerank"))
        reason = unfinished(run_dir, row["epoch"]) if run_dir is not None else None
        if reason and not allow_partial:
            raise UdaError(f"{run_dir} has not finished ({reason}): its last evaluation is not a result; let it finish "
                           "(run it again with --resume) or pass --allow-partial to see it marked")
        if reason:
            row["unfinished"] = reason


def evaluated_sets(run_dir: Path) -> str:
    """The test sets a run folder's metrics.jsonl holds, for an error message."""
    names = sorted({name for record in read_metrics(Path(run_dir) / "metrics.jsonl") for name in record if name != "epoch"})
    return ", ".join(names) or "none"


def markdown_table(results: dict, title: str) -> str:
    """One row per result ("<name>_rerank" shown as "<name> + re-ranking"), percentages, and the epoch
    evaluated when the rows have one (an unfinished run's marked UNFINISHED)."""
    with_epoch = any("epoch" in row for row in results.values())
    header = ["mAP", "rank-1", "rank-5", "rank-10"] + (["epoch"] if with_epoch else [])
    lines = [f"| {title} | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{100 * row[k]:.1f}" for k in COLUMNS]
        if with_epoch:
            cells.append(f"**UNFINISHED: {row['unfinished']}**" if "unfinished" in row else str(row.get("epoch", "-")))
        lines.append(f"| {name.replace('_rerank', ' + re-ranking')} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--allow-partial", action="store_true", help="show an unfinished run's last evaluation, marked UNFINISHED")
    args = parser.parse_args(argv)
    results = collect(args.adapt, args.target, args.oracle)
    check_finished(results, {"adapted": args.adapt, "oracle": args.oracle}, args.allow_partial)
    publish(results, f"{args.target} (target test)", args.json)
    return results


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
