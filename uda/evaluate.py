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

import torch

from uda import stage
from uda.cli import output_file, run_main
from uda.config import Config
from uda.datasets import ReIDDataset
from uda.errors import UdaError
from uda.evaluation import ensemble_distance, ensemble_weights, evaluate, pairwise_distance, re_ranking
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
        results = evaluate_ensemble(args.model, weights, args.dataset, args.opts, args.data_root)
        members = " + ".join(f"{weight:.3g} x {path}" for weight, path in zip(weights, args.model))
        publish(results, f"ensemble {members} (test)", args.json)
        return results

    model, cfg, device = stage.inference_model(args.model[0], args.opts, args.data_root)  # a bare state dict: the default model unless --opts say otherwise
    stage.set_backends(cfg)
    datasets = [stage.load_named_dataset(name, cfg, "test") for name in args.dataset]  # parsing only: a wrong path fails at once
    test_sets = [stage.make_test_set(dataset, cfg, device) for dataset in datasets]
    results = stage.evaluate_test_sets(model, test_sets, cfg, device)
    publish(results, f"{args.model[0]} (test)", args.json)
    return results


def evaluate_ensemble(paths: list[Path], weights: list[float], names: list[str], opts: list[str], data_root: str | None) -> dict[str, dict]:
    """{set name: {mAP, mINP, rank1, rank5, rank10}} (+ '<name>_rerank' under eval.rerank) of the models'
    weighted mean distances (module docstring: whose config decides what)."""
    members = [stage.inference_model(path, opts, data_root) for path in paths]
    _, cfg, device = members[0]
    stage.set_backends(cfg)
    datasets = [stage.load_named_dataset(name, cfg, "test") for name in names]  # parsing only: a wrong path fails at once
    results: dict[str, dict] = {}
    for dataset in datasets:
        query, gallery, features = member_features(members, dataset)
        q_pids, q_cams = torch.tensor([r.pid for r in query]), torch.tensor([r.camid for r in query])
        g_pids, g_cams = torch.tensor([r.pid for r in gallery]), torch.tensor([r.camid for r in gallery])
        protocol = {"ap": cfg.eval.ap, "remove_same_camera": dataset.has_cameras}

        def mean_distance(rows: str, columns: str, metric: str) -> torch.Tensor:
            return ensemble_distance((pairwise_distance(f[rows], f[columns], metric=metric, device=device) for f in features), weights)

        results[dataset.name] = scores(evaluate(mean_distance("query", "gallery", cfg.eval.metric), q_pids, g_pids, q_cams, g_cams, **protocol))
        if cfg.eval.rerank:  # the published re-ranking squares its input, so it is given Euclidean distances
            reranked = re_ranking(
                mean_distance("query", "gallery", "euclidean"), mean_distance("query", "query", "euclidean"),
                mean_distance("gallery", "gallery", "euclidean"),
                k1=cfg.eval.rerank_k1, k2=cfg.eval.rerank_k2, lambda_value=cfg.eval.rerank_lambda, device=device,
            )
            results[f"{dataset.name}_rerank"] = scores(evaluate(reranked, q_pids, g_pids, q_cams, g_cams, **protocol))
    return results


def member_features(members: list[tuple[torch.nn.Module, Config, torch.device]], dataset: ReIDDataset) -> tuple[list, list, list[dict]]:
    """(query records, gallery records, [{"query": (Q, D_m), "gallery": (G, D_m)} per model]): each model's
    L2-normalised features of the dataset's test images, extracted under its own config."""
    query, gallery, features = None, None, []
    for number, (model, cfg, device) in enumerate(members, start=1):
        test_set = stage.make_test_set(dataset, cfg, device)
        if query is None:
            query, gallery = test_set.query, test_set.gallery
        elif [r.path for r in test_set.query + test_set.gallery] != [r.path for r in query + gallery]:
            raise UdaError(f"{dataset.name}: model {number} of the ensemble keeps other test images than the first "
                           f"(data.skip_corrupt differs?): the models must score the same query and gallery")
        qf, gf = stage.test_set_features(model, test_set, cfg, stage.amp_dtype(cfg, device))
        features.append({"query": qf, "gallery": gf})
    return query, gallery, features


def scores(metrics: dict) -> dict:
    """The metrics evaluation reports, as floats (those of stage.evaluate_test_sets)."""
    return {key: float(metrics[key]) for key in ("mAP", "mINP", "rank1", "rank5", "rank10")}


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
