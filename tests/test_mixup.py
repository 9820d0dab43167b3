"""uda.mixup: the mixed batch and its draw, the soft targets by hand, the two-label CE against the explicit
soft target, and which rows each loss of a mixup step sees."""
import pytest
import scipy.special
import torch
import torch.nn.functional as F
from torch import nn

from uda import build, pretrain, settings
from uda.config import load_config
from uda.errors import ConfigError
from uda.losses import CenterLoss, triplet_loss
from uda.head_policies import BranchHeads, TrainNet
from uda.mixup import mixup, mixup_cross_entropy, mixup_losses, mixup_targets


def planted_batch(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i + 1 (so a mixed image shows which two it blends); labels 0..size-1."""
    images = (torch.arange(size, dtype=torch.float32) + 1).view(size, 1, 1, 1).expand(size, 3, 4, 2).contiguous()
    return images, torch.arange(size)


def test_mixed_images_are_lam_x_plus_one_minus_lam_x_perm():
    images, labels = planted_batch()
    mixed, labels_a, labels_b, lam = mixup(images, labels, 0.4, torch.Generator().manual_seed(0))
    assert 0 < lam < 1
    assert torch.equal(labels_a, labels) and sorted(labels_b.tolist()) == labels.tolist()  # labels_b is labels[perm]
    perm = labels_b  # the labels are the row numbers
    assert torch.equal(mixed, lam * images + (1 - lam) * images[perm])
    torch.testing.assert_close(mixed[:, 0, 0, 0], lam * (labels + 1).float() + (1 - lam) * (perm + 1).float())


def test_the_draw_is_the_beta_quantile_of_one_uniform_then_a_permutation_from_the_same_generator():
    images, labels = planted_batch()
    _, _, labels_b, lam = mixup(images, labels, 0.4, torch.Generator().manual_seed(3))
    by_hand = torch.Generator().manual_seed(3)
    uniform = torch.rand((), generator=by_hand, dtype=torch.float64).item()
    assert lam == float(scipy.special.betaincinv(0.4, 0.4, uniform))
    assert torch.equal(labels_b, torch.randperm(6, generator=by_hand))
    torch.manual_seed(5)  # no generator: torch's global one, which the engine reseeds every epoch
    first = mixup(images, labels, 0.4)
    torch.manual_seed(5)
    again = mixup(images, labels, 0.4)
    assert first[3] == again[3] and torch.equal(first[2], again[2])


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_lam_follows_beta_alpha_alpha(alpha):
    generator = torch.Generator().manual_seed(1)
    images, labels = planted_batch(2)
    draws = torch.tensor([mixup(images, labels, alpha, generator)[3] for _ in range(4000)])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 4000 draws: standard errors ~0.006 and ~0.003
    assert draws.mean().item() == pytest.approx(0.5, abs=0.03)
    assert draws.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.015)


def test_soft_targets_by_hand_and_rows_sum_to_one():
    # 3 classes, eps 0.1: smooth(0) = (0.9 + 0.1/3, 0.1/3, 0.1/3); lam 0.7 of label 0 and 0.3 of label 1.
    targets = mixup_targets(torch.tensor([0, 1]), torch.tensor([1, 1]), 0.7, 3, 0.1)
    third = 0.1 / 3
    expected = torch.tensor([[0.7 * (0.9 + third) + 0.3 * third, 0.7 * third + 0.3 * (0.9 + third), third],
                             [third, 0.9 + third, third]])
    torch.testing.assert_close(targets, expected)
    images, labels = planted_batch(8)
    _, labels_a, labels_b, lam = mixup(images, labels, 0.2, torch.Generator().manual_seed(2))
    torch.testing.assert_close(mixup_targets(labels_a, labels_b, lam, 8, 0.1).sum(1), torch.ones(8))


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_two_label_cross_entropy_equals_the_cross_entropy_with_the_explicit_soft_target(epsilon):
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    labels_a, labels_b, lam = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), torch.tensor([4, 4, 0, 3, 1, 2, 2, 0]), 0.35
    two_label = mixup_cross_entropy(logits, labels_a, labels_b, lam, epsilon)
    soft_target = mixup_targets(labels_a, labels_b, lam, 5, epsilon)
    explicit = -(soft_target * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(two_label, explicit)
    torch.testing.assert_close(two_label, F.cross_entropy(logits, soft_target))  # torch's probability-target form
    (grad_two,) = torch.autograd.grad(two_label, logits)
    (grad_explicit,) = torch.autograd.grad(explicit, logits)
    torch.testing.assert_close(grad_two, grad_explicit)


class Features(nn.Module):
    """A BatchNorm-free stand-in for ReIDModel's training forward: each row's features depend on that row only."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 4 * 2, 8)

    def forward(self, images):
        feature = self.linear(images.flatten(1))
        return {"global": feature, "bn": 2 * feature}


def test_a_mixup_step_gives_the_id_loss_the_mixed_rows_and_triplet_and_center_the_clean_rows():
    torch.manual_seed(0)
    cfg = load_config(pretrain.DEFAULTS, opts=["train.mixup_alpha=0.4"])
    net = TrainNet(Features(), BranchHeads({"source": build.build_classifier(cfg, 8, 6)}))
    center = CenterLoss(6, 8)
    images, labels = planted_batch()
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    losses = mixup_losses(net, images, pids, cfg, center, torch.Generator().manual_seed(7))
    mixed, labels_a, labels_b, lam = mixup(images, pids, 0.4, torch.Generator().manual_seed(7))  # the same draw
    clean = net.model(images)["global"]
    logits = net.heads["source"](net.model(mixed)["bn"])
    assert set(losses) == {"ce", "triplet", "center"}
    torch.testing.assert_close(losses["ce"], mixup_cross_entropy(logits, labels_a, labels_b, lam, 0.1))
    torch.testing.assert_close(losses["triplet"], triplet_loss(clean, pids, 0.3))
    torch.testing.assert_close(losses["center"], 0.0005 * center(clean, pids))


@pytest.mark.parametrize("opts, message", [
    (["train.mixup_alpha=0.2", "model.head=arcface"], "margin head needs one hard label"),
    (["train.mixup_alpha=0.2", "model.head=cosface"], "margin head needs one hard label"),
    (["train.mixup_alpha=0.2", "loss.ce_weight=0"], "mixup changes only the ID loss"),
])
def test_settings_mixup_cannot_work_with_are_refused(opts, message):
    settings.load("pretrain", None, ["model.head=arcface"])  # mixup off: any head
    with pytest.raises(ConfigError, match=message):
        settings.load("pretrain", None, opts)


def test_a_negative_alpha_is_refused_naming_the_key_and_zero_is_off():
    assert pretrain.DEFAULTS["train"]["mixup_alpha"] == 0
    with pytest.raises(ConfigError, match="train.mixup_alpha must be >= 0 and finite, got -0.1"):
        settings.check(load_config(pretrain.DEFAULTS, opts=["train.mixup_alpha=-0.1"]))
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        mixup(*planted_batch(), 0.0)
