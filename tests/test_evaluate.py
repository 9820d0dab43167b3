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
