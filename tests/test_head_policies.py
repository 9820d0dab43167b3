"""uda.head_policies: each policy's gradients reach only its own rows, the re-created rows move the
optimizer with them, and the switches (row init, temperature, re-normalisation) by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from uda import adapt, build
from uda.cluster import cluster_centers
from uda.config import load_config
from uda.head_policies import (HEAD_POLICIES, TARGET_GROUP, MergedHead, Round, SeparateHeads, TrainNet, initial_rows, param_groups, replace_head,
                               temperature_at)
from uda.models import build_model

SOURCE = (torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3]))
TARGET = (torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 0]))  # cluster ids


def policy_net(policy: str, num_source=5, num_clusters=3, *opts):
    torch.manual_seed(0)
    cfg = load_config(adapt.DEFAULTS, opts=["model.backbone=resnet18_w16", f"adapt.classifier={policy}", *opts])
    heads = HEAD_POLICIES[policy](lambda rows: build.build_classifier(cfg, 128, rows), num_source, cfg.adapt)
    net = TrainNet(build_model("resnet18_w16", "none"), heads)
    optimizer = build.build_optimizer(param_groups(net, heads), cfg)
    memory, labels = F.normalize(torch.randn(2 * num_clusters, 128), dim=1), torch.arange(2 * num_clusters) % num_clusters
    heads.recluster(Round(cluster_centers(memory, labels), memory, labels, torch.arange(2 * num_clusters) // num_clusters), optimizer)
    return net.train(), cfg, optimizer


def test_separate_heads_are_cosine_heads_whose_gradients_reach_only_their_own_rows():
    net, cfg, _ = policy_net("separate")
    assert isinstance(net.heads, SeparateHeads) and net.heads.reclustered == "target"
    out, scored = net(torch.cat([SOURCE[0], TARGET[0]]), {"source": SOURCE[1], "target": TARGET[1]})
    cos = F.normalize(out["bn"][4:], dim=1) @ F.normalize(net.heads["target"].weight, dim=1).T
    assert torch.allclose(scored["target"][0], cos / 0.1, atol=1e-5)  # logits = cos / T, by hand
    assert torch.equal(scored["target"][1], TARGET[1]) and torch.equal(scored["source"][1], SOURCE[1])
    source_rows, target_rows = net.heads["source"].weight, net.heads["target"].weight
    grad = torch.autograd.grad(F.cross_entropy(*scored["target"]), [source_rows, target_rows, net.model.backbone.conv1.weight],
                               retain_graph=True, allow_unused=True)
    assert (grad[0] is None or not grad[0].any()) and grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0
    grad = torch.autograd.grad(F.cross_entropy(*scored["source"]), [source_rows, target_rows], allow_unused=True)
    assert grad[0].abs().sum() > 0 and (grad[1] is None or not grad[1].any())


def test_merged_head_scores_both_domains_on_one_weight_with_offset_target_labels():
    net, cfg, _ = policy_net("merged", 5, 3, "loss.label_smoothing=0")
    assert isinstance(net.heads, MergedHead) and net.heads["merged"].num_classes == 8
    batch = ((*SOURCE, torch.zeros(4, dtype=torch.long)), (*TARGET, torch.zeros(4, dtype=torch.long)))
    losses = adapt.joint_losses(net, batch, cfg, torch.device("cpu"))
    with torch.no_grad():
        bn = net.model(torch.cat([SOURCE[0], TARGET[0]]))["bn"]
        logits = F.normalize(bn, dim=1) @ F.normalize(net.heads["merged"].weight, dim=1).T / 0.1
    assert losses["target_ce"].item() == pytest.approx(F.cross_entropy(logits[4:], TARGET[1] + 5).item(), rel=1e-5)
    assert losses["source_ce"].item() == pytest.approx(F.cross_entropy(logits[:4], SOURCE[1]).item(), rel=1e-5)
    weight = net.heads["merged"].weight
    grad_target = torch.autograd.grad(losses["target_ce"], weight, retain_graph=True)[0]
    grad_source = torch.autograd.grad(losses["source_ce"], weight)[0]
    # one softmax over all 8 rows: each domain's CE pulls its own rows and pushes every other row
    assert grad_target[5:].abs().sum() > 0 and grad_target[:5].abs().sum() > 0
    assert grad_source[:5].abs().sum() > 0 and grad_source[5:].abs().sum() > 0


@pytest.mark.parametrize("policy, offset", [("separate", 0), ("merged", 5)])
def test_without_a_source_batch_the_step_is_the_target_images_alone(policy, offset):
    """loss.source_weight=0 (a target-only loop) feeds no source batch: the forward, BatchNorm's batch statistics
    included, sees the target images only, and the losses are the target branch's, by hand."""
    net, cfg, _ = policy_net(policy, 5, 3, "loss.source_weight=0", "loss.label_smoothing=0")
    target = (*TARGET, torch.zeros(4, dtype=torch.long))
    alone = adapt.joint_losses(net, (None, target), cfg, torch.device("cpu"))
    assert set(alone) == {"target_ce", "target_triplet"}
    with torch.no_grad():
        bn = net.model(TARGET[0])["bn"]
        logits = F.normalize(bn, dim=1) @ F.normalize(net.heads[net.heads.reclustered].weight, dim=1).T / 0.1
    assert alone["target_ce"].item() == pytest.approx(F.cross_entropy(logits, TARGET[1] + offset).item(), rel=1e-5)
    joint = adapt.joint_losses(net, ((*SOURCE, torch.zeros(4, dtype=torch.long)), target), cfg, torch.device("cpu"))
    assert joint["target_ce"].item() != pytest.approx(alone["target_ce"].item(), rel=1e-3)  # there BatchNorm also saw the source


def test_merged_recluster_keeps_the_trained_source_rows_and_replaces_the_cluster_rows():
    net, _, optimizer = policy_net("merged", 5, 3)
    source_rows = net.heads["merged"].weight.detach()[:5].clone()
    clusters = F.normalize(torch.randn(6, 128), dim=1)
    net.heads.recluster(Round(clusters, None, None, None), optimizer)
    assert torch.equal(net.heads["merged"].weight[:5], source_rows) and torch.equal(net.heads["merged"].weight[5:], clusters)


@pytest.mark.parametrize("policy, head", [("separate", "target"), ("merged", "merged")])
def test_recluster_moves_the_optimizer_to_the_new_rows_and_trains_them(policy, head):
    net, _, optimizer = policy_net(policy)
    optimizer.load_state_dict(optimizer.state_dict())  # as on resume: the group dicts are replaced
    [group] = [g for g in optimizer.param_groups if g["name"] == TARGET_GROUP]
    assert group["params"] == [net.heads[head].weight]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    old = net.heads[head].weight
    old.grad = torch.ones_like(old)
    optimizer.step()
    assert old in optimizer.state
    features = F.normalize(torch.randn(10, 128), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, -1])
    net.heads.recluster(Round(cluster_centers(features, labels), features, labels, torch.zeros(10, dtype=torch.long)), optimizer)
    new = net.heads[head].weight
    expected = torch.stack([F.normalize(features[labels == c].mean(0), dim=0) for c in range(4)])
    assert torch.allclose(new.data[-4:], expected, atol=1e-6)
    assert group["params"] == [new] and optimizer.param_groups[1] is group and old not in optimizer.state
    before = new.detach().clone()
    new.grad = torch.ones_like(new)
    optimizer.step()
    assert not torch.equal(new.data, before)


def test_resize_gives_the_re_created_head_a_checkpoints_row_count_and_the_optimizer_its_rows():
    net, _, optimizer = policy_net("separate")
    net.heads.resize(11, optimizer)
    [group] = [g for g in optimizer.param_groups if g["name"] == TARGET_GROUP]
    assert net.heads["target"].num_classes == 11 and group["params"] == [net.heads["target"].weight]


def test_replace_head_refuses_rows_of_another_width():
    net, _, optimizer = policy_net("separate")
    with pytest.raises(ValueError, match=r"must be \(2, 128\)"):
        replace_head(net.heads["target"], optimizer, torch.zeros(2, 64))


def test_temperature_schedules_by_hand_and_set_on_every_head():
    grow = [temperature_at(0.1, "grow", e) for e in (1, 2, 3)]
    shrink = [temperature_at(0.1, "shrink", e) for e in (1, 2, 3)]
    assert grow == pytest.approx([0.1, 0.1 * (1 + math.log(2)), 0.1 * (1 + math.log(3))])
    assert grow == pytest.approx([0.1, 0.16931, 0.20986], abs=1e-5)
    assert shrink == pytest.approx([0.1, 0.05906, 0.04765], abs=1e-5)
    assert [temperature_at(0.1, "fixed", e) for e in (1, 5)] == [0.1, 0.1]
    net, _, _ = policy_net("separate")
    net.heads.set_temperature(0.25)
    assert net.heads["source"].temperature == net.heads["target"].temperature == 0.25


def test_head_rows_start_from_centres_or_a_seeded_normal_draw():
    centers = F.normalize(torch.randn(6, 32), dim=1)
    assert initial_rows(centers, "centers", 1) is centers
    rows = initial_rows(centers, "normal", 1)
    assert rows.shape == centers.shape and 0.0005 < rows.std().item() < 0.0015 and abs(rows.mean().item()) < 3e-4
    assert torch.equal(rows, initial_rows(centers, "normal", 1))  # a resumed run draws the same rows
    assert not torch.equal(rows, initial_rows(centers, "normal", 2))


def test_renormalize_rows_sets_unit_norm_rows():
    net, _, _ = policy_net("separate")
    heads = net.heads
    heads["source"].weight.data.mul_(torch.tensor([[0.01], [3.0], [1.0], [7.0], [2.0]]))
    direction = F.normalize(heads["source"].weight.detach().clone(), dim=1)
    heads.renormalize_rows()
    assert torch.allclose(heads["source"].weight.norm(dim=1), torch.ones(5)) and torch.allclose(heads["source"].weight, direction)
    assert torch.allclose(heads["target"].weight.norm(dim=1), torch.ones(3))


def memory(rows, momentum=0.2, hard=False, temperature=0.05):
    from uda.head_policies import ClusterMemory

    head = ClusterMemory(rows.shape[1], momentum, temperature, hard)
    head.reset_classifier(rows.shape[0], rows)
    return head


ROWS = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=1)
FEATURES = F.normalize(torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.6, 0.0, 0.8]]), dim=1)


def test_memory_mean_update_is_the_momentum_formula_image_by_image():
    head = memory(ROWS).train()
    head(FEATURES, torch.tensor([0, 1, 0]))
    m, by_hand = 0.2, ROWS.clone()
    for f, y in zip(FEATURES, [0, 1, 0]):  # in batch order: the second image of cluster 0 moves the already-moved row
        row = m * by_hand[y] + (1 - m) * f
        by_hand[y] = row / row.norm()
    # cluster 0 by hand: 0.2 (1,0,0) + 0.8 (0,0,1) -> (0.2, 0, 0.8)/0.8246; then with (0.6, 0, 0.8)
    first = torch.tensor([0.2, 0.0, 0.8]) / (0.2 ** 2 + 0.8 ** 2) ** 0.5
    second = 0.2 * first + 0.8 * torch.tensor([0.6, 0.0, 0.8])
    assert torch.allclose(by_hand[0], second / second.norm())
    assert torch.allclose(head.weight, by_hand, atol=1e-6)


def test_memory_hard_update_uses_the_batch_image_least_similar_to_each_row():
    head = memory(ROWS, momentum=0.1, hard=True).train()
    head(FEATURES, torch.tensor([0, 1, 0]))
    # cluster 0: cos with (1,0,0) is 0 for (0,0,1) and 0.6 for (0.6,0,0.8): the hard one is (0,0,1)
    row0 = 0.1 * ROWS[0] + 0.9 * FEATURES[0]
    row1 = 0.1 * ROWS[1] + 0.9 * FEATURES[1]
    assert torch.allclose(head.weight, torch.stack([row0 / row0.norm(), row1 / row1.norm()]), atol=1e-6)


def test_memory_logits_are_cosines_before_the_update_and_train_the_features_only():
    head = memory(ROWS, temperature=0.05).train()
    features = (3 * FEATURES).requires_grad_()  # not unit length: the memory normalises them
    logits = head(features, torch.tensor([0, 1, 0]))
    assert torch.allclose(logits, FEATURES @ ROWS.T / 0.05, atol=1e-5)
    F.cross_entropy(logits, torch.tensor([0, 1, 0])).backward()  # the in-place update left backward intact
    assert features.grad.abs().sum() > 0 and not head.weight.requires_grad
    before = head.weight.clone()
    head.eval()(FEATURES, torch.tensor([0, 1, 0]))
    assert torch.equal(head.weight, before)  # evaluation never moves the memory


def test_memory_policy_keeps_its_rows_out_of_the_optimizer_and_in_the_checkpoint():
    net, cfg, optimizer = policy_net("memory")
    assert [g["name"] for g in optimizer.param_groups] == ["body"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    assert net.heads["target"].num_classes == 3 and "heads.target.weight" in net.state_dict()
    out, scored = net(torch.cat([SOURCE[0], TARGET[0]]), {"source": SOURCE[1], "target": TARGET[1]})
    assert scored["target"][0].shape == (4, 3) and torch.equal(scored["target"][1], TARGET[1])
    source_rows = net.heads["source"].weight
    grad = torch.autograd.grad(F.cross_entropy(*scored["target"]), [source_rows, net.model.backbone.conv1.weight], allow_unused=True)
    assert (grad[0] is None or not grad[0].any()) and grad[1].abs().sum() > 0  # the memory trains the features, not the source rows
    state = net.state_dict()
    other, _, other_optimizer = policy_net("memory", 5, 1)
    other.heads.resize(3, other_optimizer)
    other.load_state_dict(state)
    assert torch.equal(other.heads["target"].weight, net.heads["target"].weight)
    net.heads.set_temperature(0.3)
    assert net.heads["source"].temperature == 0.3 and net.heads["target"].temperature == 0.05


@pytest.mark.parametrize("opts, message", [
    (["adapt.memory_momentum=0.1"], "adapt.memory_momentum applies to adapt.classifier=memory only"),
    (["adapt.proxy_negatives=10"], "adapt.proxy_negatives applies to adapt.classifier=proxies only"),
    (["adapt.classifier=proxies", "adapt.head_init=normal"], "adapt.head_init=normal does not apply to it"),
    (["adapt.classifier=memory", "adapt.head_init=normal"], "adapt.head_init=normal does not apply to it"),
    (["adapt.classifier=memory", "adapt.memory_update=median"], "adapt.memory_update must be one of mean, hard"),
    (["adapt.classifier=memory", "adapt.memory_momentum=1"], r"adapt.memory_momentum must be in \[0, 1\)"),
])
def test_memory_settings_are_refused_where_they_would_do_nothing_or_are_out_of_range(opts, message):
    from uda import settings
    from uda.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        settings.load("adapt", None, opts)


def proxies(temperature=0.5, inter_weight=0.5, negatives=1, momentum=0.2):
    from uda.head_policies import CameraProxies

    head = CameraProxies(3, momentum, temperature, inter_weight, negatives)
    memory = F.normalize(torch.tensor([[1.0, 0, 0], [0.8, 0.6, 0], [0.6, 0.8, 0], [0, 0, 1.0], [0, 0.6, 0.8], [0, 1.0, 0]]), dim=1)
    head.reset(memory, torch.tensor([0, 0, 0, 1, 1, -1]), torch.tensor([0, 1, 1, 0, 1, 0]))
    return head, memory


def test_camera_proxies_are_the_mean_of_each_cluster_and_camera():
    head, memory = proxies()
    expected = F.normalize(torch.stack([memory[0], (memory[1] + memory[2]) / 2, memory[3], memory[4]]), dim=1)
    assert torch.allclose(head.weight, expected, atol=1e-6)
    assert head.proxy_cluster.tolist() == [0, 0, 1, 1] and head.proxy_camera.tolist() == [0, 1, 0, 1]  # the outlier has none


def test_camera_proxy_loss_is_the_intra_plus_weighted_inter_camera_term_by_hand():
    head, _ = proxies(temperature=0.5, inter_weight=0.5, negatives=1)
    proxy = head.weight.clone()
    batch = F.normalize(torch.tensor([[0.7, 0.7, 0.1], [0.1, 0.2, 0.9]]), dim=1)
    labels, cameras = torch.tensor([0, 1]), torch.tensor([1, 0])
    loss = head.train()(batch, labels, cameras)
    s = (batch @ proxy.T / 0.5).tolist()
    cluster, camera = [0, 0, 1, 1], [0, 1, 0, 1]
    intra, inter = [], []
    for i, (y, k) in enumerate(zip(labels.tolist(), cameras.tolist())):
        same = [j for j in range(4) if camera[j] == k]
        own = next(j for j in same if cluster[j] == y)
        intra.append(-(s[i][own] - math.log(sum(math.exp(s[i][j]) for j in same))))
        positives = [j for j in range(4) if cluster[j] == y]
        negative = max((j for j in range(4) if cluster[j] != y), key=lambda j: s[i][j])  # negatives=1: the most similar
        denominator = math.log(sum(math.exp(s[i][j]) for j in positives + [negative]))
        inter.append(-sum(s[i][p] - denominator for p in positives) / len(positives))
    assert loss.item() == pytest.approx(sum(intra) / 2 + 0.5 * sum(inter) / 2, rel=1e-5)
    # each image moved its own proxy: image 0 (cluster 0, camera 1) proxy 1, image 1 (cluster 1, camera 0) proxy 2
    moved = proxy.clone()
    for index, feature in ((1, batch[0]), (2, batch[1])):
        moved[index] = F.normalize(0.2 * proxy[index] + 0.8 * feature, dim=0)
    assert torch.allclose(head.weight, moved, atol=1e-6)


def test_camera_proxy_policy_trains_the_features_not_the_proxies_nor_the_source_rows():
    net, cfg, optimizer = policy_net("proxies")
    memory = F.normalize(torch.randn(8, 128), dim=1)
    net.heads.recluster(Round(None, memory, torch.tensor([0, 0, 1, 1, 2, 2, 0, -1]), torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])), optimizer)
    assert net.heads["target"].num_classes == 6 and [g["name"] for g in optimizer.param_groups] == ["body"]
    out, scored = net(torch.cat([SOURCE[0], TARGET[0]]), {"source": SOURCE[1], "target": TARGET[1]},
                      {"source": torch.zeros(4, dtype=torch.long), "target": torch.tensor([0, 1, 0, 1])})
    assert scored["target"].logits is None and scored["target"].id_loss.ndim == 0
    grad = torch.autograd.grad(scored["target"].id_loss, [net.heads["source"].weight, net.model.backbone.conv1.weight], allow_unused=True)
    assert (grad[0] is None or not grad[0].any()) and grad[1].abs().sum() > 0
    losses = adapt.joint_losses(net, ((*SOURCE, torch.zeros(4, dtype=torch.long)), (*TARGET, torch.tensor([0, 1, 0, 1]))), cfg, torch.device("cpu"))
    assert set(losses) == {"source_ce", "source_triplet", "target_ce", "target_triplet"}



SHARES = ([2, 1], [0])  # the batch's images (FEATURES rows) on rank 0 and rank 1: cluster 0's hardest (row 0) on rank 1
PROXY_BATCH = F.normalize(torch.tensor([[0.7, 0.7, 0.1], [0.1, 0.2, 0.9]]), dim=1)  # image r on rank r, labels (0, 1), cameras (1, 0)


def _move_memories_on_one_rank(rank: int, store: str, out: str) -> None:
    """One torchrun-like process: its share of the batch through a hard-update memory and the proxies."""
    import torch.distributed as dist

    from uda.distributed import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    head = memory(ROWS, momentum=0.1, hard=True).train()
    head(FEATURES[SHARES[rank]], torch.tensor([0, 1, 0])[SHARES[rank]])
    camera_head, _ = proxies()
    camera_head.train()(PROXY_BATCH[[rank]], torch.tensor([rank]), torch.tensor([1 - rank]))
    torch.save({"memory": head.weight, "proxies": camera_head.weight}, f"{out}{rank}.pt")
    leave_process_group()  # a barrier first: Gloo can abort a process that leaves while the other still sends


def test_under_torchrun_every_process_moves_the_memories_by_the_whole_batch(tmp_path):
    """Two gloo processes, each with its share of a batch: both end with the memory (hard update) and the
    camera proxies one process gets from the whole batch, neither its own share's nor the main process's."""
    one = memory(ROWS, momentum=0.1, hard=True).train()
    order = SHARES[0] + SHARES[1]
    one(FEATURES[order], torch.tensor([0, 1, 0])[order])
    one_proxies, _ = proxies()
    one_proxies.train()(PROXY_BATCH, torch.tensor([0, 1]), torch.tensor([1, 0]))
    torch.multiprocessing.spawn(_move_memories_on_one_rank, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    for rank in (0, 1):
        moved = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(moved["memory"], one.weight, atol=1e-6), rank
        assert torch.allclose(moved["proxies"], one_proxies.weight, atol=1e-6), rank
    main_alone = memory(ROWS, momentum=0.1, hard=True).train()  # what DDP's buffer broadcast alone would leave everywhere
    main_alone(FEATURES[SHARES[0]], torch.tensor([0, 1, 0])[SHARES[0]])
    assert not torch.allclose(main_alone.weight, one.weight, atol=1e-3)
