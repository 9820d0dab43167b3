"""baselines/direct_transfer.py, oracle.py, merged_classifier.py, kmeans.py: thin entry points that must
hand the stages exactly the switch they name (the switches themselves are tested with the stages)."""
import pytest

from baselines import direct_transfer, kmeans, merged_classifier, oracle


@pytest.fixture
def captured(monkeypatch):
    calls = {}
    for module, stage in ((direct_transfer, "evaluate"), (oracle, "pretrain"), (merged_classifier, "adapt"), (kmeans, "adapt")):
        monkeypatch.setattr(getattr(module, stage), "main", lambda argv, stage=stage: calls.setdefault(stage, argv))
    return calls


def test_direct_transfer_is_evaluate_with_re_ranking(captured):
    direct_transfer.main(["--model", "m.pth", "--target", "duke", "--json", "o.json", "--opts", "eval.flip=false"])
    assert captured["evaluate"] == ["--model", "m.pth", "--dataset", "duke", "--json", "o.json", "--opts", "eval.rerank=true", "eval.flip=false"]


def test_oracle_is_pretrain_on_the_targets_labels(captured):
    oracle.main(["--config", "configs/pretrain/duke_mobilenet.yaml", "--target", "duke"])
    assert captured["pretrain"] == ["--source", "duke", "--output-dir", "runs/oracle/duke", "--config", "configs/pretrain/duke_mobilenet.yaml", "--opts"]


@pytest.mark.parametrize("argv, expected_opts", [
    (["--source", "market", "--target", "duke"], ["--opts", "adapt.classifier=merged"]),
    (["--opts", "seed=1", "--init", "m.pth"], ["--opts", "adapt.classifier=merged", "seed=1", "--init", "m.pth"]),
])
def test_merged_classifier_adds_its_switch_to_the_opts(captured, argv, expected_opts):
    merged_classifier.main(argv)
    assert captured["adapt"][-len(expected_opts):] == expected_opts


def test_kmeans_sets_method_and_count(captured):
    kmeans.main(["--num-clusters", "700", "--source", "duke", "--target", "market", "--opts", "seed=2"])
    assert captured["adapt"] == ["--source", "duke", "--target", "market", "--opts", "cluster.method=kmeans", "cluster.num_clusters=700", "seed=2"]
