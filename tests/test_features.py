"""uda.evaluation.features: flip averaging and normalization by hand, order, modes restored."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from uda.errors import UdaError
from uda.evaluation.features import extract_features


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
