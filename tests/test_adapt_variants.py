"""The adaptation loop's switches the ablation grid turns: merged vs separate classifier, centre vs
N(0, 0.001) head rows, temperature schedules, rows re-normalised every step, k-means pseudo-labels."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from uda import adapt, stage
from uda.cluster import kmeans_labels, pseudo_label_round
from uda.config import load_config
from uda.errors import ClusteringError, ConfigError
from uda.models import build_model
from uda.runlog import read_metrics

from tests.test_adapt import run_adapt


def merged_net(num_source=5, num_clusters=3):
    torch.manual_seed(0)
    cfg = load_config(adapt.DEFAULTS, opts=["model.backbone=resnet18_w16", "adapt.classifier=merged"])
    net = stage.TrainNet(build_model("resnet18_w16", "none"), {"merged": stage.build_classifier(cfg, 128, num_source + num_clusters)})
    return net, cfg


def test_merged_head_gets_both_domains_gradients_on_its_one_weight():
    net, cfg = merged_net()
    source = (torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 2, 3]))
    target = (torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 2, 0]))  # cluster ids: rows 5, 6, 7 of the head
    losses = adapt.joint_losses(net.train(), (source, target), cfg, torch.device("cpu"), num_source_classes=5)
    grad_target = torch.autograd.grad(losses["target_ce"], net.heads["merged"].weight, retain_graph=True)[0]
    grad_source = torch.autograd.grad(losses["source_ce"], net.heads["merged"].weight)[0]
    # a softmax over all 8 rows: each domain's CE pulls its own rows and pushes every other row, the
    # other domain's included (the separate heads' test shows those never cross)
    assert grad_target[5:].abs().sum() > 0 and grad_target[:5].abs().sum() > 0
    assert grad_source[:5].abs().sum() > 0 and grad_source[5:].abs().sum() > 0


def test_merged_target_ce_equals_the_hand_computed_one_with_offset_labels():
    net, _ = merged_net()
    cfg = load_config(adapt.DEFAULTS, opts=["model.backbone=resnet18_w16", "adapt.classifier=merged", "loss.label_smoothing=0"])
    net.train()  # BatchNorm from the batch's statistics: the same batch gives the same features twice
    source = (torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 2, 3]))
    target = (torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 2, 0]))
    losses = adapt.joint_losses(net, (source, target), cfg, torch.device("cpu"), num_source_classes=5)
    with torch.no_grad():
        bn = net.model(torch.cat([source[0], target[0]]))["bn"]
        logits = F.normalize(bn, dim=1) @ F.normalize(net.heads["merged"].weight, dim=1).T / 0.1
    assert losses["target_ce"].item() == pytest.approx(F.cross_entropy(logits[4:], target[1] + 5).item(), rel=1e-5)
    assert losses["source_ce"].item() == pytest.approx(F.cross_entropy(logits[:4], source[1]).item(), rel=1e-5)


def test_merged_optimizer_re_points_the_merged_head():
    net, cfg = merged_net()
    optimizer = adapt.build_optimizer(net, cfg)
    [group] = [g for g in optimizer.param_groups if g["name"] == adapt.TARGET_GROUP]
    assert group["params"] == [net.heads["merged"].weight]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))


def test_temperature_schedules_by_hand():
    grow = [adapt.temperature_at(0.1, "grow", e) for e in (1, 2, 3)]
    shrink = [adapt.temperature_at(0.1, "shrink", e) for e in (1, 2, 3)]
    assert grow == pytest.approx([0.1, 0.1 * (1 + math.log(2)), 0.1 * (1 + math.log(3))])
    assert grow == pytest.approx([0.1, 0.16931, 0.20986], abs=1e-5)
    assert shrink == pytest.approx([0.1, 0.05906, 0.04765], abs=1e-5)
    assert [adapt.temperature_at(0.1, "fixed", e) for e in (1, 5)] == [0.1, 0.1]


def test_head_rows_start_from_centres_or_a_seeded_normal_draw():
    centers = F.normalize(torch.randn(6, 32), dim=1)
    base = ["model.backbone=resnet18_w16"]
    assert adapt.initial_rows(centers, load_config(adapt.DEFAULTS, opts=base), 1) is centers
    cfg = load_config(adapt.DEFAULTS, opts=[*base, "adapt.head_init=normal"])
    rows = adapt.initial_rows(centers, cfg, 1)
    assert rows.shape == centers.shape and 0.0005 < rows.std().item() < 0.0015 and abs(rows.mean().item()) < 3e-4
    assert torch.equal(rows, adapt.initial_rows(centers, cfg, 1))  # a resumed run draws the same rows
    assert not torch.equal(rows, adapt.initial_rows(centers, cfg, 2))


def test_renormalize_rows_sets_unit_norm_rows():
    heads = torch.nn.ModuleDict({"a": stage.build_classifier(load_config(adapt.DEFAULTS), 16, 4)})
    heads["a"].weight.data.mul_(torch.tensor([[0.01], [3.0], [1.0], [7.0]]))
    direction = F.normalize(heads["a"].weight.detach().clone(), dim=1)
    adapt.renormalize_rows(heads)
    assert torch.allclose(heads["a"].weight.norm(dim=1), torch.ones(4)) and torch.allclose(heads["a"].weight, direction)


def test_kmeans_recovers_planted_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    truth = np.repeat(np.arange(5), 20)
    features = centres[truth] + 0.05 * torch.tensor(rng.standard_normal((100, 16)), dtype=torch.float32)
    labels = kmeans_labels(features, 5, seed=0)
    assert adjusted_rand_score(truth, labels) == 1.0 and set(labels) == set(range(5))
    assert np.array_equal(labels, kmeans_labels(features, 5, seed=0))
    round_ = pseudo_label_round(features, torch.zeros(100), k1=0, k2=0, eps=0.5, min_samples=1, method="kmeans", num_clusters=5, true_ids=truth)
    assert round_.stats["num_clusters"] == 5 and round_.stats["outlier_fraction"] == 0 and round_.stats["ari"] == 1.0
    with pytest.raises(ClusteringError, match="cluster.num_clusters <= 100"):
        kmeans_labels(features, 101)


@pytest.mark.parametrize("opt, message", [
    ("adapt.classifier=merge", "adapt.classifier must be one of separate, merged, got 'merge'; did you mean 'merged'"),
    ("adapt.head_init=zeros", "adapt.head_init must be one of centers, normal"),
    ("cluster.method=agglomerative", "cluster.method must be one of dbscan, kmeans"),
    ("adapt.temperature_schedule=grow model.head=arcface", "model.head=arcface has none"),
    ("cluster.method=kmeans cluster.num_clusters=8", "cluster.num_clusters=8 must be at least data.num_pids=16"),
])
def test_variant_settings_are_checked_before_any_data(opt, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        adapt.main(["--source", "market", "--target", "duke", "--data-root", str(tmp_path / "nowhere"), "--opts", *opt.split()])


def test_more_kmeans_clusters_than_target_images_is_refused_before_decoding(synth_root, tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.num_clusters=100000 is more than the \d+ train images of synth_duke"):
        adapt.main(["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root), "--init", str(tmp_path / "none.pth"),
                    "--opts", "data.synth_preset=tiny", "cluster.method=kmeans", "cluster.num_clusters=100000"])


def test_every_variant_runs_and_resumes_exactly(synth_root, source_model, tmp_path):
    """All switches at once on the tiny preset: merged head, N(0, 0.001) rows, growing T, rows
    re-normalised each step, k-means; cut after epoch 1 and resumed, it ends as the straight run."""
    variant = ["adapt.classifier=merged", "adapt.head_init=normal", "adapt.temperature_schedule=grow",
               "adapt.renormalize_rows=true", "cluster.method=kmeans", "cluster.num_clusters=12"]
    run_adapt(synth_root, source_model, tmp_path / "straight", *variant, "optim.epochs=2")
    run_adapt(synth_root, source_model, tmp_path / "cut", *variant, "optim.epochs=1")
    (tmp_path / "cut" / "model_final.pth").unlink()
    run_adapt(synth_root, source_model, tmp_path / "cut", *variant, "optim.epochs=2", resume=True)
    straight, cut = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "cut")
    assert straight == cut and straight[-1]["clusters"]["num_clusters"] == 12 and straight[-1]["clusters"]["outlier_fraction"] == 0
    a, b = (torch.load(tmp_path / name / "last.pth", weights_only=False) for name in ("straight", "cut"))
    assert a["num_clusters"] == b["num_clusters"] > 12  # the merged head: source rows + 12 cluster rows
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert "temperature 0.1693" in (tmp_path / "straight" / "log.txt").read_text()  # epoch 2 of the growing schedule
