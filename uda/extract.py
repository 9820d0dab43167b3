"""Features of your own images from a trained model, with the run's own preprocessing.

    python -m uda.extract --model runs/adapt/market2duke/model_final.pth --images DIR_OR_LIST --out feats.npy
        [--batch-size 128] [--device auto|cpu|cuda] [--opts key=value ...]

writes feats.npy ((N, D) float32, L2-normalised: compare with a dot product), feats.paths.txt (the
image of each row, in order) and feats.json (the model file and the settings used), all three or none.
DIR_OR_LIST is a folder (its images, recursively, in sorted order) or a text file with one image path per
line, such as a feats.paths.txt. Paths are written as UTF-8; a file name that is not UTF-8 keeps its bytes
(in Python, read the list with errors="surrogateescape" to get the names the filesystem gives).

In Python, the same in one call:

    import uda
    extractor = uda.load_model("runs/.../model_final.pth")      # device="cuda" to run on a GPU
    features = extractor(["a.jpg", "b.jpg"])                     # or PIL images; (2, D) torch.float32

Preprocessing is the run's evaluation's: resize to the run's data.height x data.width, its data.mean /
data.std (ImageNet's unless the run chose others), features of each image averaged with its mirror's when the run evaluated so (eval.flip),
and over the run's test-time scales (eval.scales, [1.0] unless the run chose more), bf16 autocast under train.amp.
The features equal what the run's own evaluation computes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

if __package__ in (None, ""):  # run as `python uda/extract.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from PIL import Image

from uda import build
from uda.cli import output_file, positive_int, run_main
from uda.config import Config
from uda.data import test_transform
from uda.data.images import read_image, to_rgb
from uda.datasets.base import IMAGE_SUFFIXES
from uda.distributed import DistInfo, pick_device
from uda.errors import UdaError
from uda.evaluation.features import extract_features, fold_batchnorm
from uda.runlog import atomic_write_all

PATHS_ERRORS = "surrogateescape"  # a file name that is not UTF-8 is written to (and read from) a paths list as its bytes


class FeatureExtractor:
    """A trained ReID model with its run's preprocessing: images -> (N, D) L2-normalised features.
    Its BatchNorms are folded once, when it is made (uda.evaluation.fold_batchnorm): weights changed in
    `model` after that are not seen; make a new FeatureExtractor."""

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device, batch_size: int | None = None):
        self.cfg = cfg
        self.device = device
        self.model = model.to(device).eval()
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.folded = fold_batchnorm(self.model)  # folded once here, not at every call
        self.transform = test_transform(cfg.data.height, cfg.data.width, tuple(cfg.data.mean), tuple(cfg.data.std))
        self.batch_size = batch_size or cfg.eval.batch_size

    @property
    def settings(self) -> dict:
        """What decides the features, for the record written beside them."""
        return {"height": self.cfg.data.height, "width": self.cfg.data.width, "flip": self.cfg.eval.flip,
                "scales": list(self.cfg.eval.scales), "amp": self.cfg.train.amp, "backbone": self.cfg.model.backbone, "feature_dim": self.model.feature_dim}

    def _batches(self, images: Sequence[Image.Image | str | Path]) -> Iterator[tuple[torch.Tensor]]:
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pil = [to_rgb(image) if isinstance(image, Image.Image) else read_image(str(image)) for image in chunk]
            yield (torch.stack([self.transform(image) for image in pil]),)

    def __call__(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """(N, D) float32 features on the CPU, one row per image, in order."""
        if len(images) == 0:
            raise UdaError("no images to extract features from")
        return extract_features(self.folded, self._batches(images), flip=self.cfg.eval.flip, normalize=True,
                                amp_dtype=build.amp_dtype(self.cfg, self.device), desc="features", fold_bn=False,
                                scales=self.cfg.eval.scales)


def load_model(path: str | Path, device: str = "auto", batch_size: int | None = None,
               opts: Sequence[str] = ()) -> FeatureExtractor:
    """A model_final.pth (or a run's last.pth) as a FeatureExtractor, built under the config saved with it."""
    model, cfg = build.load_trained_model(path, [f"device={device}", *opts])
    return FeatureExtractor(model, cfg, pick_device(DistInfo(), cfg.device), batch_size)


def list_images(source: str | Path) -> list[Path]:
    """A folder's images (recursively, sorted), or the paths listed one per line in a text file."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise UdaError(f"{source} holds no image ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images or a list file")
        return images
    if source.is_file():
        text = source.read_text(encoding="utf-8", errors=PATHS_ERRORS)
        images = [Path(line.strip()) for line in text.splitlines() if line.strip()]
        missing = [p for p in images if not p.is_file()]
        if missing:
            raise UdaError(f"{len(missing)} of the {len(images)} images listed in {source} do not exist, e.g. {missing[0]}")
        if not images:
            raise UdaError(f"{source} lists no image path")
        return images
    raise UdaError(f"--images {source}: no such folder or list file")


def main(argv: list[str] | None = None) -> np.ndarray:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="model_final.pth or last.pth of pretrain.py / adapt.py")
    parser.add_argument("--images", required=True, help="a folder of images, or a text file with one image path per line")
    parser.add_argument("--out", required=True, type=output_file(".npy", ""), help="features file (.npy); .paths.txt and .json are written beside it")
    parser.add_argument("--batch-size", type=positive_int, help="images per forward (default: the run's eval.batch_size)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. eval.flip=false")
    args = parser.parse_args(argv)

    images = list_images(args.images)
    extractor = load_model(args.model, args.device, args.batch_size, args.opts)
    features = extractor(images).numpy()
    out = args.out.with_suffix(".npy")
    record = {"model": str(args.model), "images": len(images), "shape": list(features.shape), **extractor.settings}
    atomic_write_all({
        out: lambda handle: np.save(handle, features),
        out.with_suffix(".paths.txt"): lambda handle: handle.write("".join(f"{p}\n" for p in images).encode("utf-8", PATHS_ERRORS)),
        out.with_suffix(".json"): lambda handle: handle.write((json.dumps(record, indent=2) + "\n").encode()),
    })
    print(f"{features.shape[0]} features of dimension {features.shape[1]} -> {out}")
    return features


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
