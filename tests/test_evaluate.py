"""uda/evaluate.py: a saved model scores what its own run recorded; bad model files fail in one line."""
import json
import warnings

import pytest
import torch

from uda import evaluate
from uda.errors import UdaError
from uda.runlog import read_metrics


def test_evaluate_reproduces_the_runs_own_final_metrics(source_model, synth_root, tmp_path, capsys):
    recorded = read_metrics(source_model.parent)[-1]["synth_market"]
    out = tmp_path / "metrics.json"
    results = evaluate.main(["--model", str(source_model), "--dataset", "synth_market", "--data-root", str(synth_root),
                             "--json", str(out)])
    assert set(results) == {"synth_market"}
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert results["synth_market"][key] == pytest.approx(recorded[key], abs=1e-6), key
    assert json.loads(out.read_text()) == results
    assert f"| synth_market | {100 * recorded['mAP']:.1f} |" in capsys.readouterr().out


def test_evaluate_reads_last_pth_and_several_sets_with_reranking(source_model, synth_root):
    final = evaluate.main(["--model", str(source_model), "--dataset", "synth_duke", "--data-root", str(synth_root)])
    results = evaluate.main(["--model", str(source_model.parent / "last.pth"), "--dataset", "synth_duke", "synth_market",
                             "--data-root", str(synth_root), "--opts", "eval.rerank=true"])
    assert set(results) == {"synth_duke", "synth_duke_rerank", "synth_market", "synth_market_rerank"}
    assert results["synth_duke"] == pytest.approx(final["synth_duke"])  # last.pth holds the same final weights
    assert results["synth_duke_rerank"] != pytest.approx(results["synth_duke"])  # re-ranking changes the ranking


def test_bad_model_files_fail_in_one_line(source_model, synth_root, tmp_path):
    common = ["--dataset", "synth_market", "--data-root", str(synth_root)]
    with pytest.raises(UdaError, match="cannot read the model .*missing.pth"):
        evaluate.main(["--model", str(tmp_path / "missing.pth"), *common])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UdaError, match="cannot read the model"):
        evaluate.main(["--model", str(corrupt), *common])
    with pytest.raises(UdaError, match="does not fit this model"):
        evaluate.main(["--model", str(source_model), *common, "--opts", "model.backbone=resnet18_w32"])


def test_amp_means_bf16_and_warns_on_the_cpu():
    from uda import build, settings
    from uda.config import load_config

    on = load_config(settings.defaults(), opts=["train.amp=true"])
    assert build.amp_dtype(load_config(settings.defaults()), torch.device("cpu")) is None
    with pytest.warns(RuntimeWarning, match="train.amp=false"):
        assert build.amp_dtype(on, torch.device("cpu")) is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.amp_dtype(on, torch.device("cuda")) is torch.bfloat16  # no CUDA needed: only the type is read


@pytest.fixture(scope="module")
def other_model(source_model, tmp_path_factory):
    """A second small model of another width (feature size 256, not 128) and image size (48 x 24, not 64 x 32),
    untrained: enough to check how an ensemble combines, saved as model_final.pth is. Its config names the
    default synthetic preset (small): the first model's (tiny) decides the test sets."""
    from uda import build, checkpoint, settings
    from uda.config import load_config

    cfg = load_config(settings.defaults(), opts=["model.backbone=resnet18_w32", "model.pretrained=none", "data.height=48", "data.width=24",
                                              "eval.batch_size=64", "data.num_workers=0"])
    torch.manual_seed(1)
    model = build.build_reid_model(cfg)
    path = tmp_path_factory.mktemp("other") / "model_final.pth"
    torch.save({checkpoint.MODEL: model.state_dict(), checkpoint.CONFIG: cfg.to_dict()}, path)
    return path


def each_models_distances(paths, synth_root, metric="cosine"):
    """Each model's query-gallery distances on synth_market (as the first model's config reads it: the tiny
    preset) under its own saved config, and the labels."""
    from uda import build
    from uda.data import splits
    from uda.evaluation import pairwise_distance, protocol

    distances, dataset = [], None
    for path in paths:
        model, cfg, device = build.inference_model(path, [], str(synth_root))
        dataset = dataset or splits.load_named_dataset("synth_market", cfg, "test")
        test_set = protocol.make_test_set(dataset, cfg, device)
        qf, gf = protocol.test_set_features(model, test_set, cfg, None)
        distances.append(pairwise_distance(qf, gf, metric=metric, device="cpu"))
    ids = [torch.tensor([getattr(r, key) for r in records]) for key in ("pid", "camid") for records in (test_set.query, test_set.gallery)]
    return distances, {"q_pids": ids[0], "g_pids": ids[1], "q_camids": ids[2], "g_camids": ids[3]}


def test_an_ensemble_scores_the_weighted_mean_of_its_models_distances(source_model, other_model, synth_root, tmp_path, capsys):
    from uda.evaluation import evaluate as score

    out = tmp_path / "ensemble.json"
    results = evaluate.main(["--model", str(source_model), str(other_model), "--weights", "0.3", "0.7", "--dataset", "synth_market",
                             "--data-root", str(synth_root), "--json", str(out)])
    (own, other), ids = each_models_distances([source_model, other_model], synth_root)
    assert own.shape == other.shape
    expected = score(0.3 * own + 0.7 * other, **ids)
    assert set(results) == {"synth_market"}
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert results["synth_market"][key] == pytest.approx(float(expected[key]), abs=1e-6), key
    assert json.loads(out.read_text()) == results
    assert "ensemble 0.3 x" in capsys.readouterr().out
    alone = evaluate.main(["--model", str(source_model), "--dataset", "synth_market", "--data-root", str(synth_root)])
    assert results["synth_market"]["mAP"] != pytest.approx(alone["synth_market"]["mAP"], abs=1e-3)  # the other model counts (it weighs most: an untrained
    # model at a small weight can leave the ranking, and so the mAP, almost unchanged on some machines)


def test_an_ensemble_of_a_model_with_itself_scores_as_the_model(source_model, synth_root):
    common = ["--dataset", "synth_market", "--data-root", str(synth_root), "--opts", "eval.rerank=true"]
    alone = evaluate.main(["--model", str(source_model), *common])
    twice = evaluate.main(["--model", str(source_model), str(source_model), *common])
    assert twice == alone  # equal weights of one matrix: the same distances to the bit, re-ranked or not


def test_an_ensemble_member_with_weight_zero_does_not_count(source_model, other_model, synth_root):
    common = ["--dataset", "synth_market", "--data-root", str(synth_root)]
    alone = evaluate.main(["--model", str(source_model), *common])
    assert evaluate.main(["--model", str(source_model), str(other_model), "--weights", "2", "0", *common]) == alone


@pytest.mark.parametrize("weights, message", [
    (["1"], "1 weights for 2 models"), (["1", "-1"], "must be >= 0"), (["0", "0"], "all 0"), (["nan", "1"], "must be >= 0"),
])
def test_bad_ensemble_weights_are_refused_before_any_model_is_read(tmp_path, weights, message):
    missing = [str(tmp_path / "a.pth"), str(tmp_path / "b.pth")]  # never read: the weights are refused first
    with pytest.raises(UdaError, match=message):
        evaluate.main(["--model", *missing, "--weights", *weights, "--dataset", "synth_market"])
