"""Score a saved model, or an ensemble of saved models, on the test sets of one or more datasets, with
the code the stages evaluate with.

    python uda/evaluate.py --model runs/pretrain/market/model_final.pth --dataset duke [market ...]
        [--data-root DIR] [--json PATH] [--opts eval.rerank=true train.amp=false ...]
    python uda/evaluate.py --model A.pth B.pth [--weights 0.5 0.5] --dataset duke [...]

The architecture and the evaluation settings (image size, flip averaging, test-time scales, metric,
re-ranking, bf16) come from the config saved with the model, so a model scores here what its own run
recorded; --opts changes them. Takes a model_final.pth or a run's last.pth (the model at its last epoch).

Several models are scored as an ensemble: the weighted mean of their query-gallery distance matrices
(uda.evaluation.ensemble_distance; --weights one per model, >= 0, normalised to sum 1, equal by default),
as the source documents' competition entry. Each model extracts its features under its own saved config
(image size, normalisation, flip, scales, bf16: models of different feature or image sizes combine); the
first model's config decides the test sets (data.*) and the scoring (eval.metric, eval.ap, eval.rerank*);
--opts applies to every model. With eval.rerank the models' Euclidean query-gallery, query-query and
gallery-gallery matrices are averaged alike and re-ranked once, so the k-reciprocal neighbourhoods are
the ensemble's (one re-ranking, not one per model).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python uda/evaluate.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from functools import partial

import torch

from uda import build
from uda.cli import output_file, run_main
from uda.config import Config
from uda.data import splits
from uda.datasets import ReIDDataset
from uda.datasets.base import NO_CAMERAS_NOTE
from uda.errors import UdaError
from uda.evaluation import ensemble_distance, ensemble_weights, protocol
from uda.report import publish


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, nargs="+", type=Path,
                        help="model_final.pth or last.pth of pretrain.py / adapt.py; several: their ensemble")
    parser.add_argument("--weights", nargs="+", type=float, help="the ensemble's weights, one per --model (default: equal)")
    parser.add_argument("--dataset", required=True, nargs="+", help="test sets: market, duke, msmt17, synth_market, synth_duke")
    parser.add_argument("--data-root", help="folder holding the datasets (default: the saved config's, else $UDA_DATA, else ./data)")
    parser.add_argument("--json", type=output_file(".json"), help="also write {set: {mAP, mINP, rank1, rank5, rank10}} here")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. eval.rerank=true")
    args = parser.parse_args(argv)
    weights = ensemble_weights(args.weights, len(args.model))  # refused before any model is read
    if len(args.model) > 1:
        results, datasets = evaluate_ensemble(args.model, weights, args.dataset, args.opts, args.data_root)
        members = " + ".join(f"{weight:.3g} x {path}" for weight, path in zip(weights, args.model))
        publish(results, f"ensemble {members} (test)", args.json)
    else:
        model, cfg, device = build.inference_model(args.model[0], args.opts, args.data_root)  # a bare state dict: the default model unless --opts say otherwise
        build.set_backends(cfg)
        datasets = [splits.load_named_dataset(name, cfg, "test") for name in args.dataset]  # parsing only: a wrong path fails at once
        test_sets = [protocol.make_test_set(dataset, cfg, device) for dataset in datasets]
        results = protocol.evaluate_test_sets(model, test_sets, cfg, device)
        publish(results, f"{args.model[0]} (test)", args.json)
    for dataset in datasets:
        if not dataset.has_cameras:  # its figures are not comparable with the protocol's: say so, as a run's log does
            print(f"{dataset.name}: {NO_CAMERAS_NOTE}")
    return results


def evaluate_ensemble(paths: list[Path], weights: list[float], names: list[str], opts: list[str], data_root: str | None
                      ) -> tuple[dict[str, dict], list[ReIDDataset]]:
    """({set name: {mAP, mINP, rank1, rank5, rank10}} (+ '<name>_rerank' under eval.rerank) of the models'
    weighted mean distances, the datasets) (module docstring: whose config decides what)."""
    members = [build.inference_model(path, opts, data_root) for path in paths]
    _, cfg, device = members[0]
    build.set_backends(cfg)
    datasets = [splits.load_named_dataset(name, cfg, "test") for name in names]  # parsing only: a wrong path fails at once
    results: dict[str, dict] = {}
    for dataset in datasets:
        test_set, features = member_features(members, dataset)
        results.update(protocol.score_test_set(test_set, cfg, device, partial(mean_distances, features, weights, device)))
    return results, datasets


def mean_distances(features: list[dict], weights: list[float], device: torch.device, rows: str, columns: str, metric: str) -> torch.Tensor:
    """The ensemble's distances: the weighted mean of each model's (a protocol.Distances once partially applied)."""
    return ensemble_distance((protocol.feature_distances(f, device, rows, columns, metric) for f in features), weights)


def member_features(members: list[tuple[torch.nn.Module, Config, torch.device]], dataset: ReIDDataset) -> tuple[protocol.TestSet, list[dict]]:
    """(the first model's test set, [{"query": (Q, D_m), "gallery": (G, D_m)} per model]): each model's
    L2-normalised features of the dataset's test images, extracted under its own config."""
    first, features = None, []
    for number, (model, cfg, device) in enumerate(members, start=1):
        test_set = protocol.make_test_set(dataset, cfg, device)
        first = first or test_set
        if [r.path for r in test_set.query + test_set.gallery] != [r.path for r in first.query + first.gallery]:
            raise UdaError(f"{dataset.name}: model {number} of the ensemble keeps other test images than the first "
                           f"(data.skip_corrupt differs?): the models must score the same query and gallery")
        qf, gf = protocol.test_set_features(model, test_set, cfg, build.amp_dtype(cfg, device))
        features.append({"query": qf, "gallery": gf})
    return first, features


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
