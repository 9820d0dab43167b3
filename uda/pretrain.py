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

from uda import checkpoint, stage
from uda.cli import run_main, stage_parser
from uda.config import load_config
from uda.distributed import convert_sync_bn, init_distributed, pick_device, wrap_model
from uda.engine import fit, seed_everything, set_lr, train_steps
from uda.losses import CenterLoss
from uda.mixup import check_mixup, mixup_losses
from uda.runlog import RunDir

DEFAULTS = stage.defaults(
    loss={"center_weight": 0.0005, "center_lr": 0.5},
    train={"mixup_alpha": 0.0},  # > 0: the ID loss on images mixed with lam ~ Beta(alpha, alpha) (uda.mixup); 0: off
)


def default_output_dir(source: str) -> Path:
    return Path("runs") / "pretrain" / source


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="backbone weights: imagenet, none or a PATH (sets model.pretrained)")
    args = parser.parse_args(argv)
    opts = stage.cli_overrides(args)
    if args.pretrained:
        opts.insert(0, f"model.pretrained={args.pretrained}")
    cfg = load_config(DEFAULTS, args.config, opts)
    stage.check_settings(cfg)
    check_mixup(cfg)
    stage.set_backends(cfg)

    dist = init_distributed()
    device = pick_device(dist, cfg.device)
    source = stage.load_named_dataset(cfg.data.source, cfg, "source")  # parsing only: a wrong path fails at once
    target = stage.load_named_dataset(cfg.data.target, cfg, "target") if cfg.data.target else None
    seed_everything(cfg.seed)
    model = stage.build_reid_model(cfg)  # before any image is decoded: a wrong weights path fails early
    run = RunDir(args.output_dir or default_output_dir(source.name), cfg, resume=args.resume, is_main=dist.is_main,
                 provenance={"backbone_weights": model.backbone.weights_source})

    train_records, train_images = stage.prepare_train_split(source.train, cfg, device)
    loader = stage.make_train_loader(train_records, cfg, train_images, rank=dist.rank, world_size=dist.world_size)
    test_sets = []
    for dataset in [d for d in (source, target) if d is not None]:
        run.log(dataset.summary())
        test_sets.append(stage.make_test_set(dataset, cfg, device))

    num_classes = len({r.pid for r in train_records})
    net = stage.TrainNet(model, {"source": stage.build_classifier(cfg, model.feature_dim, num_classes)}).to(device)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    net = convert_sync_bn(net, dist, cfg.train.sync_bn)
    optimizer = stage.build_optimizer(net.parameters(), cfg)
    center = CenterLoss(num_classes, model.feature_dim, cfg.loss.center_weight, cfg.loss.center_lr).to(device) if cfg.loss.center_weight > 0 else None
    losses_with_state = {"center": center} if center is not None else {}  # losses that train their own parameters

    start_epoch = 0
    resumed = run.load_checkpoint() if args.resume else None
    if resumed is not None:
        net.load_state_dict(resumed[checkpoint.NET])
        optimizer.load_state_dict(resumed[checkpoint.OPTIMIZER])
        for name, loss in losses_with_state.items():
            loss.load_state_dict(resumed[name])
        start_epoch = resumed[checkpoint.EPOCH]
        run.log(f"resumed at epoch {start_epoch}")
        run.drop_metrics_after(start_epoch)
    train_net = wrap_model(net, dist)
    schedule = stage.build_schedule(cfg)
    amp = stage.amp_dtype(cfg, device)

    def compute_losses(batch) -> dict:
        images, pids = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if cfg.train.mixup_alpha > 0:  # the ID loss on a mixed copy of the batch, triplet and center on the clean images
            return mixup_losses(train_net, images, pids, cfg, center)
        out, logits = train_net(images, {"source": (slice(None), pids)})
        losses = stage.reid_losses(out["global"], logits["source"], pids, cfg)
        if center is not None:
            losses["center"] = center.weight * center(out["global"], pids)
        return losses

    def train_epoch(epoch: int) -> dict:
        lr = schedule.lr(epoch)
        set_lr(optimizer, lr)
        loader.sampler.set_epoch(epoch)
        losses = train_steps(
            loader, compute_losses, [optimizer, *losses_with_state.values()], num_steps=len(loader), device=device,
            amp_dtype=amp, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
        )
        return {"train": {**losses, "lr": lr}}

    def evaluate(epoch: int) -> dict:
        return stage.evaluate_test_sets(net.model, test_sets, cfg, device, dist)

    def checkpoint_state(epoch: int) -> dict:
        state = {checkpoint.EPOCH: epoch, checkpoint.NET: net.state_dict(), checkpoint.OPTIMIZER: optimizer.state_dict(),
                 checkpoint.CONFIG: cfg.to_dict()}
        return {**state, **{name: loss.state_dict() for name, loss in losses_with_state.items()}}

    metrics = fit(
        run, start_epoch=start_epoch, epochs=cfg.optim.epochs, train_epoch=train_epoch, evaluate=evaluate,
        eval_every=cfg.train.eval_every, checkpoint_state=checkpoint_state, seed=cfg.seed,
    )
    run.save_final_model({checkpoint.MODEL: net.model.state_dict(), checkpoint.CONFIG: cfg.to_dict()})
    run.close()
    return metrics


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
