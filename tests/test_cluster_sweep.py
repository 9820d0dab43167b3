"""uda.cluster_sweep: one row per DBSCAN setting, the same clusters adapt.py would make."""
import json

import pytest
import torch
import torch.nn.functional as F

from uda import cluster_sweep
from uda.errors import UdaError

from tests.test_adapt import read_metrics, run_adapt
from tests.test_custom_dataset import synth_as_custom


def blobs(num_ids=5, per_id=8, dim=32, noise=0.05, seed=0):
    """(N, D) features: tight groups around random unit centres, and their ids."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_ids, dim, generator=g), dim=1)
    ids = torch.arange(num_ids).repeat_interleave(per_id)
    return F.normalize(centres[ids] + noise * torch.randn(len(ids), dim, generator=g), dim=1), ids.numpy()


def test_rows_follow_eps_and_a_setting_without_cluster_keeps_the_sweep_going():
    features, ids = blobs()
    rows = cluster_sweep.sweep(features, None, ids, eps=[0.5, 0.05], min_samples=[2, 40], k1=10, k2=3, device="cpu")
    assert [(r["eps"], r["min_samples"]) for r in rows] == [(0.5, 2), (0.5, 40), (0.05, 2), (0.05, 40)]
    tight = rows[0]
    assert tight["num_clusters"] == 5 and tight["outlier_fraction"] == 0.0  # each group is one cluster
    assert tight["ari"] == pytest.approx(1.0) and tight["pairwise_precision"] == pytest.approx(1.0)
    assert rows[1] == {"eps": 0.5, "min_samples": 40, "num_clusters": 0, "outlier_fraction": 1.0}  # 40 > any group
    text = cluster_sweep.format_rows(rows, num_ids=5)
    assert "(true ids: 5)" in text and text.splitlines()[1].split()[:4] == ["0.5", "2", "5", "0.000"]


def test_camera_means_are_removed_when_cameras_are_given():
    features, ids = blobs(num_ids=4, per_id=6, noise=0.02)
    camids = torch.tensor([0, 1] * 12)
    shifted = F.normalize(features + 2.0 * F.one_hot(torch.as_tensor(camids), features.shape[1]).float(), dim=1)
    kept = cluster_sweep.sweep(shifted, None, ids, eps=[0.5], min_samples=[2], k1=5, k2=2, device="cpu")[0]
    removed = cluster_sweep.sweep(shifted, camids, ids, eps=[0.5], min_samples=[2], k1=5, k2=2, device="cpu")[0]
    assert kept["ari"] < 0.5  # a camera's offset outweighs the identity: clusters follow cameras
    assert removed["ari"] == pytest.approx(1.0)


def test_an_empty_setting_list_is_refused():
    features, ids = blobs()
    with pytest.raises(UdaError, match="at least one eps"):
        cluster_sweep.sweep(features, None, ids, eps=[], min_samples=[4])


@pytest.mark.parametrize("eps, min_samples", [([0.5, 0.0], [2]), ([1.5], [2]), ([0.5], [0])])
def test_out_of_range_settings_are_refused_not_reported_as_no_cluster(eps, min_samples):
    features, ids = blobs()
    with pytest.raises(UdaError, match=r"--eps values must lie in \(0, 1\)"):
        cluster_sweep.sweep(features, None, ids, eps=eps, min_samples=min_samples, k1=10, k2=3, device="cpu")


def test_the_command_checks_its_settings_before_loading_a_model(tmp_path):
    """No model file, no data: the bad setting is what is reported, before minutes of extraction."""
    for flags, message in ((["--eps", "1.5"], r"--eps values must lie in \(0, 1\)"), (["--k1", "0"], "--k1 and --k2 must be >= 1, got k1 0")):
        with pytest.raises(UdaError, match=message):
            cluster_sweep.main(["--model", str(tmp_path / "none.pth"), "--dataset", "duke", *flags])


def test_scores_are_shown_when_the_first_setting_finds_no_cluster():
    features, ids = blobs()
    rows = cluster_sweep.sweep(features, None, ids, eps=[0.5], min_samples=[40, 2], k1=10, k2=3, device="cpu")
    lines = cluster_sweep.format_rows(rows, num_ids=5).splitlines()
    assert "ARI" in lines[0] and lines[1].split() == ["0.5", "40", "0", "1.000"]
    assert lines[2].split()[4:6] == ["1.000", "1.000"]  # NMI, ARI of the setting that clusters


def test_the_cli_reproduces_adapts_first_clustering(synth_root, source_model, tmp_path):
    """Epoch 1 of adapt.py clusters the source model's features: the sweep at its settings must agree exactly."""
    run_adapt(synth_root, source_model, tmp_path / "run", "optim.epochs=1")
    adapt_stats = read_metrics(tmp_path / "run")[1]["clusters"]
    out = tmp_path / "sweep.json"
    rows = cluster_sweep.main(["--model", str(source_model), "--dataset", "synth_duke", "--data-root", str(synth_root),
                               "--eps", "0.4", "0.6", "--min-samples", "2", "--k1", "10", "--out", str(out),
                               "--opts", "device=cpu", "data.num_workers=0"])
    assert {k: rows[0][k] for k in adapt_stats} == pytest.approx(adapt_stats)
    assert rows[1]["eps"] == 0.6 and rows[1]["outlier_fraction"] <= rows[0]["outlier_fraction"]  # a wider eps only adds core points
    saved = json.loads(out.read_text())
    assert saved["dataset"] == "synth_duke" and saved["camera_normalize"] is False and saved["rows"] == rows
    shop = synth_as_custom(synth_root, tmp_path / "shop", cameras=False, train_ids=True)
    with pytest.raises(UdaError, match="--camera-normalize needs camera ids"):
        cluster_sweep.main(["--model", str(source_model), "--dataset", str(shop), "--camera-normalize", "--opts", "device=cpu"])
