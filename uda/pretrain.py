"""Stage 1: the source strong baseline (Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person
Re-ID", CVPR-W 2019) trained on the labelled source; with --target it also reports direct transfer.

    python uda/pretrain.py --source market --target duke [--config configs/pretrain/market.yaml]
        [--output-dir DIR] [--resume] [--pretrained PATH] [--opts key=value ...]

Each trick has its own switch (configs/pretrain/bot_ablation/ turns them on one at a time):
warmup (optim.warmup_epochs), random erasing (data.erasing_p), label smoothing (loss.label_smoothing),
last stride 1 (model.last_stride), BNNeck (model.bnneck), center loss (loss.center_weight).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python uda/pretrain.py`: import the package, not uda/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from uda import checkpoint
from uda.build import amp_dtype, build_classifier, build_optimizer, build_reid_model, build_schedule, runtime
from uda.cli import config_overrides, run_main, stage_parser
from uda.config import Config
from uda.data.splits import load_named_dataset, make_train_loader, prepare_train_split
from uda.datasets import ReIDDataset
from uda.distributed import DistInfo, convert_sync_bn, wrap_model
from uda.engine import fit, seed_everything, train_steps
from uda.evaluation.protocol import evaluate_test_sets, make_test_set
from uda.head_policies import BranchHeads, TrainNet
from uda.losses import CenterLoss, reid_losses
from uda.mixup import mixup_losses
from uda.models import ReIDModel
from uda.runlog import RunDir
from uda.schedule import set_lr
from uda.settings import defaults, load

DEFAULTS = defaults("pretrain")


def default_output_dir(source: str) -> Path:
    return Path("runs") / "pretrain" / source


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="backbone weights: imagenet, none or a PATH (sets model.pretrained)")
    args = parser.parse_args(argv)
    cfg = load("pretrain", args.config, config_overrides(args))
    dist, device = runtime(cfg)
    source = load_named_dataset(cfg.data.source, cfg, "source")  # parsing only: a wrong path fails at once
    target = load_named_dataset(cfg.data.target, cfg, "target") if cfg.data.target else None
    seed_everything(cfg.seed)
    model = build_reid_model(cfg)  # before any image is decoded: a wrong weights path fails early
    run = RunDir(args.output_dir or default_output_dir(source.name), cfg, resume=args.resume, is_main=dist.is_main,
                 provenance={"backbone_weights": model.backbone.weights_source})
    return fit(run, SourceTraining(cfg, run, model, source, target, device, dist))


class SourceTraining:
    """Everything the source stage trains with, built once: the labelled split's P x K loader, the test
    sets (the source's, and the target's for direct transfer), the model with its one head, the
    optimizer and the center loss. `uda.engine.fit` runs the epochs, checkpoints and resumes."""

    def __init__(self, cfg: Config, run: RunDir, model: ReIDModel, source: ReIDDataset, target: ReIDDataset | None,
                 device: torch.device, dist: DistInfo):
        self.cfg, self.device, self.dist = cfg, device, dist
        self.epochs, self.eval_every, self.seed = cfg.optim.epochs, cfg.train.eval_every, cfg.seed
        train_records, train_images = prepare_train_split(source.train, cfg, device)
        self.loader = make_train_loader(train_records, cfg, train_images, rank=dist.rank, world_size=dist.world_size)
        self.test_sets = []
        for dataset in [d for d in (source, target) if d is not None]:
            run.log(dataset.summary())
            self.test_sets.append(make_test_set(dataset, cfg, device))
        num_classes = len({r.pid for r in train_records})
        net = TrainNet(model, BranchHeads({"source": build_classifier(cfg, model.feature_dim, num_classes)})).to(device)
        if cfg.train.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = convert_sync_bn(net, dist, cfg.train.sync_bn)
        self.optimizer = build_optimizer(self.net.parameters(), cfg)
        self.center = CenterLoss(num_classes, model.feature_dim, cfg.loss.center_weight, cfg.loss.center_lr).to(device) \
            if cfg.loss.center_weight > 0 else None
        self.train_net = wrap_model(self.net, dist)
        self.schedule, self.amp = build_schedule(cfg), amp_dtype(cfg, device)

    def start(self) -> None:
        """Nothing before the first epoch."""

    def train_epoch(self, epoch: int) -> dict:
        lr = self.schedule.lr(epoch)
        set_lr(self.optimizer, lr)
        self.loader.sampler.set_epoch(epoch)
        steppers = [self.optimizer] + ([self.center] if self.center is not None else [])  # the center loss trains its own centres
        losses = train_steps(self.loader, self.step_losses, steppers, num_steps=len(self.loader), device=self.device,
                             amp_dtype=self.amp, desc=f"epoch {epoch + 1}/{self.epochs}")
        return {"train": {**losses, "lr": lr}}

    def step_losses(self, batch) -> dict[str, torch.Tensor]:
        """ID + triplet on one P x K batch (+ the center loss on the pooled features; under train.mixup_alpha, uda.mixup's step)."""
        images, pids = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.cfg.train.mixup_alpha > 0:  # the ID loss on a mixed copy of the batch, triplet and center on the clean images
            return mixup_losses(self.train_net, images, pids, self.cfg, self.center)
        out, scored = self.train_net(images, {"source": pids})
        losses = reid_losses(out["global"], scored["source"][0], pids, self.cfg.loss)
        if self.center is not None:
            losses["center"] = self.center.weight * self.center(out["global"], pids)
        return losses

    def evaluate(self, epoch: int) -> dict:
        return evaluate_test_sets(self.net.model, self.test_sets, self.cfg, self.device, self.dist)

    def state_dict(self, epoch: int) -> dict:
        state = {checkpoint.EPOCH: epoch, checkpoint.NET: self.net.state_dict(), checkpoint.OPTIMIZER: self.optimizer.state_dict(),
                 checkpoint.CONFIG: self.cfg.to_dict()}
        return {**state, "center": self.center.state_dict()} if self.center is not None else state

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state[checkpoint.NET])
        self.optimizer.load_state_dict(state[checkpoint.OPTIMIZER])
        if self.center is not None:
            self.center.load_state_dict(state["center"])

    def final_model(self) -> dict:
        return {checkpoint.MODEL: self.net.model.state_dict(), checkpoint.CONFIG: self.cfg.to_dict()}


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
