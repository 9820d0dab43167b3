"""A trained model as an ONNX file, for serving without PyTorch.

    python -m uda.export --model runs/adapt/market2duke/model_final.pth --out model.onnx [--opset 18]

The exported graph is what the run's evaluation computes from a batch of preprocessed images:

    input  "images"   (batch, 3, H, W) float32: RGB resized to the run's data.height x data.width,
                      scaled to [0, 1], normalised with the run's data.mean / data.std (ImageNet's by default)
    output "features" (batch, D) float32: flip-averaged when the run evaluated so (eval.flip), averaged
                      over the run's test-time scales (eval.scales: each a bilinear resize inside the
                      graph), L2-normalised

with a dynamic batch axis. H, W, the mean/std, the scales and D are written beside it in <out>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as `python uda/export.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F
from torch import nn

from uda import build
from uda.cli import output_file, run_main
from uda.errors import UdaError
from uda.evaluation.features import multi_scale_features


class InferenceFeatures(nn.Module):
    """images (B, 3, H, W) -> L2-normalised (B, D) features, as uda.evaluation.extract_features computes them."""

    def __init__(self, model: nn.Module, flip: bool, scales: Sequence[float] = (1.0,)):
        super().__init__()
        self.model = model.eval()
        self.flip = flip
        self.scales = tuple(scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(multi_scale_features(self.model, images, self.scales, self.flip), dim=1)


def export_onnx(path: str | Path, out: str | Path, opset: int = 18) -> dict:
    """Write `out` (.onnx) and `out`.json from a saved model; returns the JSON record."""
    model, cfg = build.load_trained_model(path, ["device=cpu"])
    net = InferenceFeatures(model, cfg.eval.flip, cfg.eval.scales).eval()
    example = torch.zeros(2, 3, cfg.data.height, cfg.data.width)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            net, (example,), str(out), input_names=["images"], output_names=["features"], opset_version=opset,
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
        )
    except ImportError as exc:
        raise UdaError(f"ONNX export needs onnx and onnxscript (pip install -e '.[test]'): {exc}") from None
    written = written_opset(out)
    if written != opset:  # torch's converter gives up on some versions with a logged warning, keeping its own
        out.unlink()
        raise UdaError(f"torch's ONNX exporter could not write opset {opset} (it wrote {written}, now removed); "
                       f"use --opset {written} or another version its converter supports")
    record = {
        "model": str(path), "input": "images", "output": "features", "height": cfg.data.height, "width": cfg.data.width,
        "mean": list(cfg.data.mean), "std": list(cfg.data.std), "flip": cfg.eval.flip, "scales": list(cfg.eval.scales), "feature_dim": model.feature_dim,
        "opset": opset,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def written_opset(path: Path) -> int:
    """The default-domain opset version an ONNX file declares (what a runtime will load it as)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model_final.pth or last.pth of pretrain.py / adapt.py")
    parser.add_argument("--out", required=True, type=output_file(".onnx"), help="the .onnx file to write (its .json beside it)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    args = parser.parse_args(argv)
    record = export_onnx(args.model, args.out, args.opset)
    print(f"{args.out}: images (batch, 3, {record['height']}, {record['width']}) -> features (batch, {record['feature_dim']})")
    return record


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
