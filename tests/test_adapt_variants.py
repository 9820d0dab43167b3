"""The adaptation loop's switches the ablation grid turns: merged vs separate classifier, centre vs
N(0, 0.001) head rows, temperature schedules, rows re-normalised every step, k-means pseudo-labels."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from uda import adapt
from uda.cluster import kmeans_labels, pseudo_label_round
from uda.errors import ClusteringError, ConfigError
from uda.runlog import read_metrics

from tests.test_adapt import run_adapt


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
    ("adapt.classifier=merge", "adapt.classifier must be one of separate, merged, memory, proxies, got 'merge'; did you mean 'merged'"),
    ("adapt.head_init=zeros", "adapt.head_init must be one of centers, normal"),
    ("cluster.method=agglomerative", "cluster.method must be one of dbscan, kmeans"),
    ("adapt.temperature_schedule=grow model.head=arcface", "model.head=arcface has none"),
    ("cluster.method=kmeans cluster.num_clusters=8", "cluster.num_clusters=8 must be at least data.num_pids=16"),
    ("adapt.teacher_momentum=1", r"adapt.teacher_momentum must be in \[0, 1\), got 1"),
    ("adapt.soft_ce_weight=0.3", "adapt.soft_ce_weight applies to the mean teacher only"),
    ("adapt.teacher_momentum=0.99 adapt.classifier=proxies", "the camera proxies give no logits for the soft ID loss"),
])
def test_variant_settings_are_checked_before_any_data(opt, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        adapt.main(["--source", "market", "--target", "duke", "--data-root", str(tmp_path / "nowhere"), "--opts", *opt.split()])


def test_more_kmeans_clusters_than_target_images_is_refused_before_decoding(synth_root, tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.num_clusters=100000 is more than the \d+ train images of synth_duke"):
        adapt.main(["--source", "synth_market", "--target", "synth_duke", "--data-root", str(synth_root), "--init", str(tmp_path / "none.pth"),
                    "--opts", "data.synth_preset=tiny", "cluster.method=kmeans", "cluster.num_clusters=100000"])


VARIANTS = {  # all switches at once: two runs cover every policy and setting the grid turns
    "merged": ["adapt.classifier=merged", "adapt.head_init=normal", "adapt.temperature_schedule=grow",
               "adapt.renormalize_rows=true", "adapt.xbm_size=96", "cluster.method=kmeans", "cluster.num_clusters=12"],
    "memory": ["adapt.classifier=memory", "adapt.memory_update=hard", "adapt.memory_momentum=0.1", "adapt.temperature_schedule=grow",
               "cluster.method=kmeans", "cluster.num_clusters=12"],
    "proxies": ["adapt.classifier=proxies", "adapt.proxy_negatives=5", "adapt.proxy_inter_weight=1.0", "adapt.temperature_schedule=grow",
                "model.frozen_blocks=2", "cluster.method=kmeans", "cluster.num_clusters=12"],
    "target_only": ["loss.source_weight=0", "adapt.classifier=separate", "adapt.temperature_schedule=grow", "model.frozen_blocks=2",
                    "cluster.method=kmeans", "cluster.num_clusters=12"],
    "mean_teacher": ["adapt.teacher_momentum=0.9", "adapt.soft_triplet_weight=0.5", "adapt.classifier=memory", "adapt.xbm_size=96",
                     "adapt.temperature_schedule=grow", "cluster.method=kmeans", "cluster.num_clusters=12"],
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_runs_and_resumes_exactly(name, synth_root, source_model, tmp_path):
    """On the tiny preset, cut after epoch 1 and resumed, each variant ends as its straight run."""
    variant = VARIANTS[name]
    run_adapt(synth_root, source_model, tmp_path / "straight", *variant, "optim.epochs=2")
    run_adapt(synth_root, source_model, tmp_path / "cut", *variant, "optim.epochs=1")
    (tmp_path / "cut" / "model_final.pth").unlink()
    run_adapt(synth_root, source_model, tmp_path / "cut", *variant, "optim.epochs=2", resume=True)
    straight, cut = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "cut")
    assert straight == cut and straight[-1]["clusters"]["num_clusters"] == 12 and straight[-1]["clusters"]["outlier_fraction"] == 0
    a, b = (torch.load(tmp_path / folder / "last.pth", weights_only=False) for folder in ("straight", "cut"))
    rows = {"merged": a["num_clusters"] > 12, "memory": a["num_clusters"] == 12, "proxies": a["num_clusters"] >= 12,  # + source rows; + cameras
            "mean_teacher": a["num_clusters"] == 12, "target_only": a["num_clusters"] == 12}
    assert a["num_clusters"] == b["num_clusters"] and rows[name]
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert ("teacher" in a) == (name == "mean_teacher") and all(torch.equal(a["teacher"][k], b["teacher"][k]) for k in a.get("teacher", {}))
    log = (tmp_path / "straight" / "log.txt").read_text()
    assert "temperature 0.1693" in log  # epoch 2 of the growing schedule
    assert ("source_ce" in log) == (name != "target_only")  # loss.source_weight=0: no source batch, no source loss


def test_the_cross_batch_memory_changes_the_target_triplet(synth_root, source_model, tmp_path):
    """adapt.xbm_size: the target triplet mines the memory too, so its logged mean over the round differs."""
    import re

    common = ["cluster.method=kmeans", "cluster.num_clusters=12", "optim.epochs=1", "adapt.iters=6"]
    losses = {}
    for name, extra in (("plain", []), ("xbm", ["adapt.xbm_size=256"])):
        run_adapt(synth_root, source_model, tmp_path / name, *common, *extra)
        line = next(l for l in (tmp_path / name / "log.txt").read_text().splitlines() if "epoch 1/1" in l)
        losses[name] = {key: float(value) for key, value in re.findall(r"(\w+_triplet) ([\d.e-]+)", line)}
    assert losses["xbm"]["target_triplet"] != pytest.approx(losses["plain"]["target_triplet"], abs=1e-4)
