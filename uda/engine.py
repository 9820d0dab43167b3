"""The one training engine both stages share: lr schedule, seeding, the step loop, the epoch loop with
evaluation, atomic checkpoints and resume.

pretrain.py and adapt.py differ only in what one epoch does (adapt.py clusters first) and in the
losses of one step: each is a stage object that `fit` runs.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from uda import checkpoint
from uda.errors import UdaError
from uda.runlog import RunDir


def seed_everything(seed: int, epoch: int = 0) -> None:
    """Seed python, numpy and torch from (seed, epoch): each epoch starts from a state that a resumed run
    reproduces exactly, without pickling RNG states."""
    value = (seed * 100_003 + epoch) % 2**31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


class Steps(Protocol):
    """What train_steps steps after each backward: a torch optimizer, or a loss that trains its own
    parameters (uda.losses.CenterLoss)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> None: ...


def train_steps(
    batches: Iterable,
    compute_losses: Callable[[object], dict[str, torch.Tensor]],
    optimizers: Sequence[Steps],
    *,
    num_steps: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """Run the optimisation steps of one epoch; return the mean of each named loss.

    `compute_losses(batch)` returns named scalar losses (already weighted); their sum is minimised,
    and every one of `optimizers` steps after each backward, in order; the first is the model's torch
    optimizer (its parameters are watched, its lr named in messages). A diverging run stops with a
    message, before the epoch's checkpoint, so the last good one stays: a non-finite loss, or the
    first optimizer's parameters growing DIVERGENCE_GROWTH-fold in norm within the epoch (a finite
    divergence: lr 1e6 gives losses ~1e13 and a useless model without one NaN).
    """
    sums: dict[str, float] = {}
    steps = 0
    params = [p for group in optimizers[0].param_groups for p in group["params"]]
    start_norm = _norm(params)
    progress = tqdm(batches, total=num_steps, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for batch in progress:
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            losses = compute_losses(batch)
        total = sum(losses.values())
        if not torch.isfinite(total):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise UdaError(f"non-finite loss at step {steps} of {desc} ({detail}); {_divergence_advice(optimizers)}")
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        for optimizer in optimizers:
            optimizer.step()
        norm = _norm(params)
        if start_norm > 0 and norm > DIVERGENCE_GROWTH * start_norm:
            raise UdaError(
                f"the run is diverging: at step {steps} of {desc} the weights' norm grew from {start_norm:.4g} to "
                f"{norm:.4g} (loss {total.item():.4g}); {_divergence_advice(optimizers)}"
            )
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        steps += 1
        progress.set_postfix(loss=f"{total.item():.3f}")
    if steps == 0:
        raise UdaError(f"{desc}: the loader yielded no batch; the training split is smaller than one P x K batch")
    return {name: value / steps for name, value in sums.items()}


DIVERGENCE_GROWTH = 10.0  # weight-norm growth within one epoch that only a diverging run shows (a healthy one: a few %)


def _norm(params: list[torch.Tensor]) -> float:
    if not params:
        return 0.0
    with torch.no_grad():
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params))))


def _divergence_advice(optimizers: Sequence[Steps]) -> str:
    lr = optimizers[0].param_groups[0]["lr"]
    return (f"lower optim.lr (this step's lr: {lr:.3g}) or check the data, and start again in a new --output-dir: "
            "the last checkpoint is intact, but --resume continues a run only with the settings it started with")


class Stage(Protocol):
    """What `fit` runs: a stage object that built everything it trains with (uda.pretrain.SourceTraining,
    uda.adapt.Adaptation)."""

    epochs: int
    eval_every: int
    seed: int

    def start(self) -> None: ...  # a fresh run's work before epoch 1 (adaptation: the direct transfer)

    def train_epoch(self, epoch: int) -> dict[str, dict[str, float]]: ...

    def evaluate(self, epoch: int) -> dict[str, dict[str, float]]: ...

    def state_dict(self, epoch: int) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def final_model(self) -> dict: ...


def fit(run: RunDir, stage: Stage) -> dict[str, dict[str, float]]:
    """A stage's whole run: restore its last checkpoint (or start it fresh), then each epoch reseed,
    train, evaluate every `eval_every` epochs and at the last, checkpoint atomically; then save the
    final model and close the run. Returns the last evaluation's record (never a best-epoch pick).

    `stage.train_epoch(epoch)` returns {"train": {loss name: mean, ...}, <section>: {...}, ...}: the
    "train" losses go to TensorBoard and the log; any other section (adapt's "clusters") is recorded in
    metrics.jsonl every epoch, beside that epoch's test metrics when it evaluates."""
    start_epoch = restore(run, stage)
    last_metrics: dict[str, dict[str, float]] = {}
    for epoch in range(start_epoch, stage.epochs):
        seed_everything(stage.seed, epoch)
        start = time.perf_counter()
        record = stage.train_epoch(epoch)
        losses = record.pop("train")
        seconds = time.perf_counter() - start
        run.scalars({**losses, "epoch_seconds": seconds}, epoch + 1, prefix="train/")
        run.log(f"epoch {epoch + 1}/{stage.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in losses.items()) + f" ({seconds:.1f} s)")
        if evaluates(epoch, stage.eval_every, stage.epochs):
            start = time.perf_counter()
            record = {**stage.evaluate(epoch), **record}
            last_metrics = record
            log_evaluation(run, epoch + 1, record)
            run.log(f"evaluation took {time.perf_counter() - start:.1f} s")
        elif record:
            run.log_metrics(epoch + 1, record)
        run.save_checkpoint(stage.state_dict(epoch + 1))
    run.save_final_model(stage.final_model())
    run.close()
    return last_metrics


def restore(run: RunDir, stage: Stage) -> int:
    """The epoch to go on from: a resumed run's checkpoint loaded into the stage (the records written
    after it forgotten), or 0 after the stage's fresh start."""
    state = run.load_checkpoint() if run.resuming else None
    if state is None:
        stage.start()
        return 0
    stage.load_state_dict(state)
    epoch = state[checkpoint.EPOCH]
    run.log(f"resumed at epoch {epoch}")
    run.drop_metrics_after(epoch)
    return epoch


def evaluates(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether `fit` evaluates after 0-based `epoch`: every `eval_every` epochs and always at the last."""
    return (epoch + 1) % eval_every == 0 or epoch + 1 == epochs


def log_evaluation(run: RunDir, epoch: int, metrics: dict[str, dict]) -> None:
    """metrics.jsonl + TensorBoard, and one readable log line per evaluated test set."""
    run.log_metrics(epoch, metrics)
    for set_name, m in metrics.items():
        if "mAP" in m:
            run.log(
                f"epoch {epoch} {set_name}: mAP {m['mAP']:.2%} rank-1 {m['rank1']:.2%} "
                f"rank-5 {m['rank5']:.2%} rank-10 {m['rank10']:.2%} mINP {m['mINP']:.2%}"
            )
