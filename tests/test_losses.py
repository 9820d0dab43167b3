"""Values of the three strong-baseline losses against hand-computed and brute-force answers."""
import math

import pytest
import torch
import torch.nn.functional as F

from uda.errors import ConfigError
from uda.config import Config
from uda.losses import CenterLoss, CrossBatchMemory, cross_entropy_label_smooth, reid_losses, triplet_loss


# ---------------------------------------------------------------- label-smoothed cross-entropy

def test_label_smoothing_three_classes_by_hand():
    # logits (1, 2, 3), true class 0, eps 0.3 -> q = (0.8, 0.1, 0.1).
    # loss = -sum_c q_c log p_c = logsumexp(z) - sum_c q_c z_c = LSE - (0.8 + 0.2 + 0.3)
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    expected_row0 = lse - 1.3
    # second row: logits (0, 0, 0), true class 2: uniform p, loss = log 3 whatever q is
    expected = (expected_row0 + math.log(3)) / 2
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    loss = cross_entropy_label_smooth(logits, torch.tensor([0, 2]), epsilon=0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_matches_smoothed_target_formula_on_random_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    eps, num_classes = 0.1, 5
    q = torch.full((6, num_classes), eps / num_classes, dtype=torch.float64)
    q[torch.arange(6), targets] += 1 - eps
    expected = -(q * logits.log_softmax(1)).sum(1).mean()
    assert cross_entropy_label_smooth(logits, targets, eps).item() == pytest.approx(expected.item(), rel=1e-12)


def test_label_smoothing_eps_zero_is_plain_cross_entropy():
    torch.manual_seed(1)
    logits, targets = torch.randn(8, 7), torch.randint(0, 7, (8,))
    plain = -logits.log_softmax(1)[torch.arange(8), targets].mean()
    assert cross_entropy_label_smooth(logits, targets, epsilon=0.0).item() == pytest.approx(plain.item(), rel=1e-6)


def test_label_smoothing_rejects_epsilon_one():
    with pytest.raises(ConfigError, match="epsilon"):
        cross_entropy_label_smooth(torch.zeros(2, 3), torch.tensor([0, 1]), epsilon=1.0)


# ---------------------------------------------------------------- batch-hard triplet

def brute_force_triplet(features, targets, margin, soft_margin):
    """Double loop over anchors and candidates; anchors without a positive or negative skipped."""
    per_anchor = []
    for a in range(len(targets)):
        pos = [torch.linalg.norm(features[a] - features[p]) for p in range(len(targets))
               if p != a and targets[p] == targets[a]]
        neg = [torch.linalg.norm(features[a] - features[n]) for n in range(len(targets))
               if targets[n] != targets[a]]
        if not pos or not neg:
            continue
        gap = max(pos, key=lambda d: d.item()) - min(neg, key=lambda d: d.item())
        per_anchor.append(F.softplus(gap) if soft_margin else F.relu(gap + margin))
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize("soft_margin", [False, True])
def test_triplet_matches_brute_force_value_and_gradient(soft_margin):
    torch.manual_seed(2)
    num_ids, k = 4, 3
    targets = torch.arange(num_ids).repeat_interleave(k)[torch.randperm(num_ids * k)]
    targets = torch.cat([targets, torch.tensor([9])])  # a singleton id: no positive, left out
    features = (torch.randn(len(targets), 8, dtype=torch.float64) * 0.3).requires_grad_()

    loss = triplet_loss(features, targets, margin=0.3, soft_margin=soft_margin)
    (grad,) = torch.autograd.grad(loss, features)

    expected = brute_force_triplet(features, targets, 0.3, soft_margin)
    (expected_grad,) = torch.autograd.grad(expected, features)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-5)
    assert loss.item() > 0


def test_triplet_with_a_cross_batch_memory_by_hand():
    """Batch 0, 1 (id 0) and 5, 6 (id 1); memory 0.5 (id 1), 2.5 (id 0), 9 (id 0), newest first. Farthest
    positive and closest negative per anchor: 0: 9 (memory) and 0.5 (memory); 1: 9 -> 8 and 0.5; 5: 0.5
    (memory, 4.5) and 2.5 (memory, 2.5); 6: 0.5 (memory, 5.5) and 9 (memory, 3)."""
    memory = CrossBatchMemory(size=3)
    memory.enqueue(torch.tensor([[9.0]]), torch.tensor([0]))
    memory.enqueue(torch.tensor([[0.5], [2.5]]), torch.tensor([1, 0]))
    assert memory.features.flatten().tolist() == [0.5, 2.5, 9.0] and memory.labels.tolist() == [1, 0, 0]
    features, targets = torch.tensor([[0.0], [1.0], [5.0], [6.0]]), torch.tensor([0, 0, 1, 1])
    by_hand = ((9 - 0.5 + 0.3) + (8 - 0.5 + 0.3) + (4.5 - 2.5 + 0.3) + (5.5 - 3 + 0.3)) / 4
    assert triplet_loss(features, targets, margin=0.3, memory=memory).item() == pytest.approx(by_hand, rel=1e-6)
    assert triplet_loss(features, targets, margin=0.3, memory=CrossBatchMemory(8)).item() == triplet_loss(features, targets).item()


def test_triplet_with_memory_matches_brute_force_over_batch_and_memory():
    torch.manual_seed(4)
    batch_ids = torch.arange(4).repeat_interleave(2)
    memory_ids = torch.randint(0, 6, (20,))
    features = (torch.randn(8, 5, dtype=torch.float64) * 0.5).requires_grad_()
    memory = CrossBatchMemory(size=20)
    memory.enqueue(torch.randn(20, 5, dtype=torch.float64) * 0.5, memory_ids)
    loss = triplet_loss(features, batch_ids, margin=0.3, memory=memory)
    per_anchor = []
    for a in range(8):
        pos = [torch.linalg.norm(features[a] - features[p]) for p in range(8) if p != a and batch_ids[p] == batch_ids[a]]
        pos += [torch.linalg.norm(features[a] - memory.features[m]) for m in range(20) if memory_ids[m] == batch_ids[a]]
        neg = [torch.linalg.norm(features[a] - features[n]) for n in range(8) if batch_ids[n] != batch_ids[a]]
        neg += [torch.linalg.norm(features[a] - memory.features[m]) for m in range(20) if memory_ids[m] != batch_ids[a]]
        per_anchor.append(F.relu(max(pos) - min(neg) + 0.3))
    expected = torch.stack(per_anchor).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,), (expected_grad,) = torch.autograd.grad(loss, features), torch.autograd.grad(expected, features)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6)


XBM_SHARES = ({"features": [[0.0]], "labels": [0]}, {"features": [[10.0], [11.0]], "labels": [1, 2]}), \
    ({"features": [[1.0]], "labels": [3]}, {"features": [[12.0]], "labels": [4]})  # two steps' shares of rank 0, 1


def _fill_cross_batch_memory_on_one_rank(rank: int, store: str, out: str) -> None:
    """One torchrun-like process: its share of two steps' target features into a 4-image XBM."""
    import torch.distributed as dist

    from uda.distributed import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    memory = CrossBatchMemory(size=4)
    for step in XBM_SHARES:
        memory.enqueue(torch.tensor(step[rank]["features"]), torch.tensor(step[rank]["labels"]))
    torch.save({"features": memory.features, "labels": memory.labels}, f"{out}{rank}.pt")
    leave_process_group()


def test_under_torchrun_the_cross_batch_memory_holds_every_process_features(tmp_path):
    """Shares of unequal size (1 and 2 images, then 1 and 1): both processes hold the newest 4 of all of
    them, each step's in rank order: step 1's (1, 12) before step 0's (0, 10; 11 dropped)."""
    torch.multiprocessing.spawn(_fill_cross_batch_memory_on_one_rank, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    for rank in (0, 1):
        held = torch.load(tmp_path / f"rank{rank}.pt")
        assert held["features"].flatten().tolist() == [1.0, 12.0, 0.0, 10.0], rank
        assert held["labels"].tolist() == [3, 4, 0, 1], rank


def test_cross_batch_memory_keeps_the_newest_features_and_reid_losses_feed_it():
    memory = CrossBatchMemory(size=5)
    for step in range(3):  # 3 batches of 2: the oldest image drops out
        memory.enqueue(torch.full((2, 1), float(step)), torch.tensor([step, step]))
    assert memory.features.flatten().tolist() == [2, 2, 1, 1, 0] and memory.labels.tolist() == [2, 2, 1, 1, 0]
    loss_cfg = Config({"ce_weight": 0.0, "triplet_weight": 1.0, "triplet_margin": 0.3, "soft_margin": False, "label_smoothing": 0.1})
    features = torch.tensor([[0.0], [1.0], [5.0], [6.0]], requires_grad=True)
    with_memory = reid_losses(features, None, torch.tensor([0, 0, 1, 1]), loss_cfg, memory=memory)["triplet"]
    assert with_memory.item() != pytest.approx(reid_losses(features, None, torch.tensor([0, 0, 1, 1]), loss_cfg)["triplet"].item())
    assert memory.features.flatten().tolist() == [0, 1, 5, 6, 2] and not memory.features.requires_grad
    memory.reset()
    assert memory.features is None


def test_triplet_margin_arithmetic_on_four_points():
    # 1-d points 0, 1 (id 0) and 3, 6 (id 1); (d_ap, d_an) per anchor: (1, 3), (1, 2), (3, 2), (3, 5)
    features = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    targets = torch.tensor([0, 0, 1, 1])
    gaps = [1 - 3, 1 - 2, 3 - 2, 3 - 5]
    hinge = sum(max(g + 0.3, 0.0) for g in gaps) / 4  # only anchor 2 is active: 1.3 / 4
    soft = sum(math.log1p(math.exp(g)) for g in gaps) / 4
    assert hinge == pytest.approx(0.325)
    assert triplet_loss(features, targets, margin=0.3).item() == pytest.approx(hinge, rel=1e-5)
    assert triplet_loss(features, targets, soft_margin=True).item() == pytest.approx(soft, rel=1e-5)


def test_triplet_anchor_without_positive_is_excluded_from_mean():
    # ids 0, 0, 1: anchor 2 has no positive. Anchors 0, 1: d_ap = 1, d_an = 2 and 1.
    features = torch.tensor([[0.0], [1.0], [2.0]])
    loss = triplet_loss(features, torch.tensor([0, 0, 1]), margin=0.5)
    assert loss.item() == pytest.approx((0.0 + 0.5) / 2, rel=1e-5)


def test_triplet_without_any_triplet_is_zero_and_differentiable():
    features = torch.randn(4, 3, requires_grad=True)
    for targets in (torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5])):
        loss = triplet_loss(features, targets)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(features.grad, torch.zeros_like(features))


def test_triplet_is_zero_when_ids_are_far_apart():
    torch.manual_seed(3)
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    targets = torch.arange(3).repeat_interleave(4)
    features = centers[targets] + 0.1 * torch.randn(12, 2)
    assert triplet_loss(features, targets, margin=0.3).item() == 0.0


def test_triplet_gradients_finite_on_duplicate_features():
    features = torch.ones(4, 16, requires_grad=True)
    targets = torch.tensor([0, 0, 1, 1])
    for soft_margin in (False, True):
        loss = triplet_loss(features, targets, margin=0.3, soft_margin=soft_margin)
        (grad,) = torch.autograd.grad(loss, features)
        assert torch.isfinite(grad).all()
        # every distance is ~0: hinge gives the margin, soft margin log 2
        assert loss.item() == pytest.approx(0.3 if not soft_margin else math.log(2), abs=1e-3)


# ---------------------------------------------------------------- center loss

def test_center_loss_value_by_hand():
    center_loss = CenterLoss(num_classes=2, feat_dim=2)
    with torch.no_grad():
        center_loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    features = torch.tensor([[3.0, 4.0], [1.0, 2.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    # squared distances 25, 1, 2 -> (25 + 1 + 2) / 3
    assert center_loss(features, targets).item() == pytest.approx(28 / 3, rel=1e-6)


def step_once(weight, lr):
    torch.manual_seed(4)
    center_loss = CenterLoss(num_classes=4, feat_dim=3, weight=weight, lr=lr)
    centers_before = center_loss.centers.detach().clone()
    features = torch.randn(5, 3, requires_grad=True)
    targets = torch.tensor([0, 2, 0, 3, 2])  # class 1 absent
    total = F.relu(features).sum() + weight * center_loss(features, targets)
    total.backward()
    center_loss.step()
    return centers_before, features.detach(), targets, center_loss.centers.detach()


def test_center_loss_step_moves_centres_by_unweighted_gradient():
    weight, lr, batch = 0.0005, 0.5, 5
    before, features, targets, after = step_once(weight, lr)
    expected = before.clone()
    for j in range(4):
        members = [i for i in range(batch) if targets[i] == j]
        pull = sum((before[j] - features[i] for i in members), torch.zeros(3))
        expected[j] = before[j] - lr * (2 / batch) * pull
    assert torch.allclose(after, expected, atol=1e-5)
    assert torch.equal(after[1], before[1])  # absent class does not move
    assert not torch.allclose(after[0], before[0])


def test_center_loss_is_stepped_and_saved_like_an_optimizer_and_a_module():
    """What the engine and the checkpoints rely on: zero_grad/step, and a state_dict of the centres only."""
    torch.manual_seed(0)
    center_loss = CenterLoss(3, 2)
    assert list(center_loss.state_dict()) == ["centers"]
    center_loss.step()  # no gradient yet: nothing moves
    center_loss(torch.randn(4, 2), torch.tensor([0, 1, 1, 2])).backward()
    center_loss.zero_grad(set_to_none=True)
    assert center_loss.centers.grad is None
    copy = CenterLoss(3, 2)
    copy.load_state_dict(center_loss.state_dict())
    assert torch.equal(copy.centers, center_loss.centers)


def test_center_loss_rejects_zero_weight_or_lr():
    with pytest.raises(ConfigError, match="weight and lr must be positive"):
        CenterLoss(2, 2, weight=0.0)
    with pytest.raises(ConfigError, match="weight and lr must be positive"):
        CenterLoss(2, 2, lr=-1.0)
