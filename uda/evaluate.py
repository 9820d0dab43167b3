"""Score a saved model on the test sets of one or more datasets, with the code the stages evaluate with.

    python uda/evaluate.py --model runs/pretrain/market/model_final.pth --dataset duke [market ...]
        [--data-root DIR] [--json PATH] [--opts eval.rerank=true train.amp=false ...]

The architecture and the evaluation settings (image size, flip averaging, metric, re-ranking, bf16)
come from the config saved with the model, so a model scores here what its own run recorded;
--opts changes them. Takes a model_final.pth or a run's last.pth (the model at its last epoch).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python uda/evaluate.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from uda import build
from uda.evaluation import protocol
from uda.data import splits
from uda.cli import output_file, run_main
from uda.datasets.base import NO_CAMERAS_NOTE
from uda.report import publish


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model_final.pth or last.pth of pretrain.py / adapt.py")
    parser.add_argument("--dataset", required=True, nargs="+", help="test sets: market, duke, msmt17, synth_market, synth_duke")
    parser.add_argument("--data-root", help="folder holding the datasets (default: the saved config's, else $UDA_DATA, else ./data)")
    parser.add_argument("--json", type=output_file(".json"), help="also write {set: {mAP, mINP, rank1, rank5, rank10}} here")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. eval.rerank=true")
    args = parser.parse_args(argv)

    model, cfg, device = build.inference_model(args.model, args.opts, args.data_root)  # a bare state dict: the default model unless --opts say otherwise
    build.set_backends(cfg)
    datasets = [splits.load_named_dataset(name, cfg, "test") for name in args.dataset]  # parsing only: a wrong path fails at once
    test_sets = [protocol.make_test_set(dataset, cfg, device) for dataset in datasets]
    results = protocol.evaluate_test_sets(model, test_sets, cfg, device)
    publish(results, f"{args.model} (test)", args.json)
    for dataset in datasets:
        if not dataset.has_cameras:  # its figures are not comparable with the protocol's: say so, as a run's log does
            print(f"{dataset.name}: {NO_CAMERAS_NOTE}")
    return results


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
