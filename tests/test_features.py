"""uda.evaluation.features: flip and multi-scale averaging and normalization by hand, order, modes restored, BatchNorm folding."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from uda.errors import UdaError
from uda.evaluation.features import extract_features, fold_batchnorm
from uda.models import build_model


class ColumnMeans(nn.Module):
    """feature = W @ (mean over channels and rows of each pixel column): not flip-invariant.

    Records whether each forward ran in eval mode and under inference mode.
    """

    def __init__(self, weight: list[list[float]]):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(weight))
        self.dropout = nn.Dropout(0.5)  # would scramble features if left in train mode
        self.calls = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        columns = images.mean(dim=(1, 2))  # (B, W)
        return self.dropout(columns @ self.weight.T)


def image(left: float, right: float) -> torch.Tensor:
    """A (3, 1, 2) image whose left column is `left` and right column is `right` in every channel."""
    return torch.tensor([left, right]).expand(3, 1, 2).clone()


def batches(images: torch.Tensor, batch_size: int) -> list[tuple]:
    """Loader batches shaped like our datasets': (img, pid, camid, index)."""
    index = torch.arange(len(images))
    return [(img, idx, idx, idx) for img, idx in zip(images.split(batch_size), index.split(batch_size))]


def test_flip_average_and_normalization_by_hand():
    model = ColumnMeans([[1.0, 0.0], [0.0, 2.0]])  # (left, right) -> (left, 2 * right)
    loader = batches(torch.stack([image(1.0, 3.0)]), batch_size=1)
    # Plain: (1, 6). Mirrored image (3, 1): (3, 2). Flip average: (2, 4); normalized: (1, 2) / sqrt(5).
    plain = extract_features(model, loader, flip=False, normalize=False)
    torch.testing.assert_close(plain, torch.tensor([[1.0, 6.0]]))
    flip_averaged = extract_features(model, loader, flip=True, normalize=False)
    torch.testing.assert_close(flip_averaged, torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(
        extract_features(model, loader, flip=True, normalize=True), torch.tensor([[1.0, 2.0]]) / 5**0.5
    )
    # Without flip, normalization acts on (1, 6) itself.
    torch.testing.assert_close(
        extract_features(model, loader, flip=False, normalize=True), torch.tensor([[1.0, 6.0]]) / 37**0.5
    )


def test_rows_follow_loader_order_across_batches():
    model = ColumnMeans([[1.0, 0.0], [0.0, 1.0]])
    images = torch.stack([image(float(k), float(10 * k)) for k in range(10)])
    loader = DataLoader(TensorDataset(images), batch_size=3)  # batches of 3, 3, 3, 1
    features = extract_features(model, loader, flip=False, normalize=False)
    expected = torch.tensor([[float(k), float(10 * k)] for k in range(10)])
    torch.testing.assert_close(features, expected)


def test_runs_in_eval_and_inference_mode_and_restores_every_submodule_mode():
    model = ColumnMeans([[1.0, 0.0], [0.0, 1.0]])
    model.train()
    model.dropout.eval()  # a mixed state must come back exactly
    features = extract_features(model, batches(torch.stack([image(1.0, 2.0)] * 4), batch_size=2))
    assert model.calls == [(False, True)] * 4  # two batches, each with its mirror
    assert model.training is True and model.dropout.training is False
    assert not features.requires_grad

    model.eval()
    extract_features(model, batches(torch.stack([image(1.0, 2.0)]), batch_size=1))
    assert model.training is False and model.dropout.training is False


def test_mode_is_restored_when_the_model_fails():
    model = ColumnMeans([[1.0, 0.0, 0.0]])  # wrong width: the forward raises
    model.train()
    with pytest.raises(RuntimeError):
        extract_features(model, batches(torch.stack([image(1.0, 2.0)]), batch_size=1))
    assert model.training is True and model.dropout.training is True


def test_bfloat16_autocast_returns_float32_close_to_full_precision():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8))
    torch.manual_seed(0)
    model[1].reset_parameters()
    loader = batches(torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1)), batch_size=2)
    full = extract_features(model, loader)
    mixed = extract_features(model, loader, amp_dtype=torch.bfloat16)
    assert mixed.dtype == torch.float32
    assert not torch.equal(mixed, full)  # autocast really ran in bfloat16
    torch.testing.assert_close(mixed, full, rtol=0, atol=3e-2)


class ReturnsTuple(nn.Module):
    def forward(self, images):
        return images.flatten(1), images.flatten(1)


@pytest.mark.parametrize(
    "model,loader,message",
    [
        (ReturnsTuple(), batches(torch.zeros(2, 3, 1, 2), 1), r"must return a \(batch, feature_dim\) tensor"),
        (ColumnMeans([[1.0, 0.0]]), [], "no batches"),
        (ColumnMeans([[1.0, 0.0]]), [torch.zeros(2, 3, 1, 2)], "first element is a \\(B, 3, H, W\\)"),
    ],
)
def test_bad_inputs_raise_uda_error(model, loader, message):
    with pytest.raises(UdaError, match=message):
        extract_features(model, loader)


def conv_bn_relu() -> nn.Sequential:
    """conv -> BatchNorm (non-trivial running statistics and affine) -> ReLU -> pool, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    batchnorm = model[1]
    batchnorm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    batchnorm.running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
    batchnorm.weight.data.copy_(torch.tensor([1.5, -0.5, 1.0, 2.0]))
    batchnorm.bias.data.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    return model.eval()


def test_fold_batchnorm_gives_the_same_outputs_without_batchnorm_and_leaves_the_model_alone():
    model = conv_bn_relu()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # the folded conv is conv * gamma / sqrt(var + eps), bias (b - mean) * gamma / sqrt(var + eps) + beta
    conv, bn = model[0], model[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    [folded_conv] = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    torch.testing.assert_close(folded_conv.weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded_conv.bias, (conv.bias - bn.running_mean) * scale + bn.bias)
    images = torch.randn(5, 3, 6, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(images), model(images), rtol=1e-5, atol=1e-6)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fold_batchnorm_returns_models_it_cannot_or_need_not_fold_unchanged():
    plain = ColumnMeans([[1.0, 0.0]]).eval()
    assert fold_batchnorm(plain) is plain  # no BatchNorm: not traced (its forward records calls)

    class ThresholdOnValue(nn.Module):  # control flow on a tensor's value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.body = conv_bn_relu()

        def forward(self, images):
            features = self.body(images)
            return features if features.sum() > 0 else -features

    untraceable = ThresholdOnValue().eval()
    assert fold_batchnorm(untraceable) is untraceable
    loader = batches(torch.randn(4, 3, 6, 4, generator=torch.Generator().manual_seed(2)), batch_size=2)
    torch.testing.assert_close(extract_features(untraceable, loader), extract_features(untraceable, loader, fold_bn=False))
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(conv_bn_relu().train())


@pytest.mark.parametrize("backbone,pooling,embedding_dim", [("mobilenet_v2", "avg", 0), ("resnet18_w16", "gem", 16)])
def test_reid_model_features_are_the_same_folded_or_not(backbone, pooling, embedding_dim):
    torch.manual_seed(0)
    model = build_model(backbone, "none", 1, pooling, True, embedding_dim)
    with torch.no_grad():  # running statistics away from BatchNorm's initial 0 / 1
        for _ in range(3):
            model(torch.randn(8, 3, 32, 16))
    model.train()
    loader = batches(torch.randn(6, 3, 32, 16, generator=torch.Generator().manual_seed(3)), batch_size=3)
    plain = extract_features(model, loader, fold_bn=False)
    folded = extract_features(model, loader)
    torch.testing.assert_close(folded, plain, rtol=0, atol=1e-5)
    assert model.training  # the caller's mode comes back, as without folding
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fold_batchnorm(model.eval()).modules()) == 0


class MeanAndMeanSquare(nn.Module):
    """feature = (mean of the image, mean of its square): any input size; downscaling averages pixels,
    which keeps the mean and lowers the mean square, so the scales' features differ and are computable by hand."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([images.mean(dim=(1, 2, 3)), images.pow(2).mean(dim=(1, 2, 3))], dim=1)


def test_multi_scale_average_by_hand():
    loader = batches(torch.stack([image(1.0, 3.0)]), batch_size=1)  # (3, 1, 2): columns 1 and 3
    # Scale 1: mean 2, mean square (1 + 9) / 2 = 5. Scale 0.5: one pixel, the columns' mean 2: (2, 4).
    # Mean over the scales (2, 4.5); normalised (4, 9) / sqrt(97).
    model = MeanAndMeanSquare()
    torch.testing.assert_close(extract_features(model, loader, normalize=False, scales=[1.0]), torch.tensor([[2.0, 5.0]]))
    torch.testing.assert_close(extract_features(model, loader, normalize=False, scales=[0.5]), torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(extract_features(model, loader, scales=[0.5, 1.0]), torch.tensor([[4.0, 9.0]]) / 97**0.5)


def trained_like_reid_model(backbone: str = "resnet18_w16", pooling: str = "gem") -> nn.Module:
    """A small ReID model with BatchNorm running statistics away from their initial 0 / 1, in eval mode."""
    torch.manual_seed(0)
    model = build_model(backbone, "none", 1, pooling, True, 0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 16))
    return model.eval()


def test_scale_one_is_exactly_the_single_scale_feature():
    model = trained_like_reid_model()
    images = torch.randn(5, 3, 32, 16, generator=torch.Generator().manual_seed(4))
    loader = batches(images, batch_size=3)
    with torch.inference_mode():  # the single-scale feature as extract_features computed it before eval.scales
        by_hand = F.normalize((model(images).float() + model(images.flip(3)).float()) / 2, dim=1)
    assert torch.equal(extract_features(model, loader, fold_bn=False, scales=[1.0]), by_hand)
    assert torch.equal(extract_features(model, loader, scales=[1.0]), extract_features(model, loader))


@pytest.mark.parametrize("flip", [True, False])
def test_multi_scale_features_are_the_mean_of_each_scales_features(flip):
    model = trained_like_reid_model()
    images = torch.randn(5, 3, 32, 16, generator=torch.Generator().manual_seed(5))
    loader = batches(images, batch_size=2)
    per_scale = []
    with torch.inference_mode():
        for size in ((16, 8), (32, 16)):  # round(32 * 0.5), round(16 * 0.5); scale 1.0 as it is
            resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if size != (32, 16) else images
            features = model(resized)
            if flip:
                features = (features + model(resized.flip(3))) / 2
            per_scale.append(features)
    brute_force = F.normalize((per_scale[0] + per_scale[1]) / 2, dim=1)
    got = extract_features(model, loader, flip=flip, scales=[0.5, 1.0])  # BatchNorm folded: the same up to rounding
    torch.testing.assert_close(got, brute_force, rtol=0, atol=1e-5)
    assert not torch.allclose(got, extract_features(model, loader, flip=flip), atol=1e-3)  # the half scale counts


def test_an_empty_scale_list_is_refused():
    with pytest.raises(UdaError, match="scales is empty"):
        extract_features(MeanAndMeanSquare(), batches(torch.stack([image(1.0, 3.0)]), batch_size=1), scales=[])
