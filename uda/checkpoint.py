"""Our checkpoint files, in one place: what they hold and how to read them.

    last.pth         a run's state after each epoch (written atomically by uda.runlog.RunDir):
                     {"epoch", "net": the model with its heads (keys "model.*", "heads.<name>.*"),
                      "optimizer", "config"} + adapt's "num_clusters" (rows of the target head)
                      + pretrain's losses that train their own parameters ("center")
    model_final.pth  the trained model for the next stage or for users: {"model": ReIDModel state, "config"}

A bare state dict (a user's file, torchvision's) reads as {"model": it}. Keys may carry DDP's
"module." prefix; a backbone is the "backbone.*" part of a ReIDModel state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from uda.errors import UdaError

MODEL = "model"  # model_final.pth: the ReIDModel's state dict
NET = "net"  # last.pth: the ReIDModel and its classifier heads (uda.head_policies.TrainNet)
CONFIG = "config"  # the resolved config of the run that wrote the file
EPOCH = "epoch"  # last.pth: epochs finished
OPTIMIZER = "optimizer"
NUM_CLUSTERS = "num_clusters"  # adapt's last.pth: the rows of the head re-created from the clusters (target, or merged) at that epoch
TEACHER = "teacher"  # adapt's last.pth under adapt.teacher_momentum > 0: the mean teacher (a TrainNet)


def read(path: str | Path, what: str = "model", *, advice: str = "") -> dict[str, Any]:
    """A checkpoint of ours as a dict ({MODEL: state} for a bare state dict), or UdaError in one line
    naming the file (`advice` is added to the message: what to do about it)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data: no code runs
    except Exception as exc:  # pickle, zip, torch and OS errors all mean "this file cannot be used"
        head = _first_bytes(path)
        if head is not None and not head.startswith(TORCH_MAGIC):  # a text file's pickle error says "KeyError: 101"
            raise UdaError(f"cannot read the {what} {path}: not a torch checkpoint (neither a zip archive nor a pickle; "
                           f"{f'it starts {head!r}' if head else 'it is empty'}){advice}") from None
        lines = str(exc).strip().splitlines() or [""]
        detail = lines[0][:160] + (" ..." if len(lines) > 1 or len(lines[0]) > 160 else "")
        raise UdaError(f"cannot read the {what} {path} ({type(exc).__name__}: {detail}){advice}") from None
    if not isinstance(checkpoint, dict):
        raise UdaError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint of pretrain.py / adapt.py")
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return {MODEL: checkpoint}  # a bare state dict
    return checkpoint


TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # how torch.save's files start: a zip archive, or (legacy) a pickle of protocol 2+


def _first_bytes(path: str | Path, count: int = 12) -> bytes | None:
    """The file's first bytes (None when it cannot be opened: the load error says why)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except OSError:
        return None


def model_state(checkpoint: dict[str, Any], path: str | Path = "the checkpoint") -> dict[str, torch.Tensor]:
    """The ReIDModel's state dict from either kind: model_final.pth's MODEL, or the "model." part of
    last.pth's NET (the heads left out); DDP's "module." prefix removed. UdaError naming `path` for a
    dict of neither kind."""
    if MODEL not in checkpoint and NET not in checkpoint:
        keys = ", ".join(map(str, list(checkpoint)[:6])) + (", ..." if len(checkpoint) > 6 else "")
        raise UdaError(f"{path} holds a dict of [{keys}], neither a state dict nor a checkpoint of pretrain.py / "
                       f"adapt.py (which hold '{MODEL}' or '{NET}')")
    if MODEL in checkpoint:
        state = checkpoint[MODEL]
    else:
        state = {key[len("model."):]: value for key, value in checkpoint[NET].items() if key.startswith("model.")}
    return {key.removeprefix("module."): value for key, value in state.items()}


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone part of a state dict: a ReIDModel's "backbone.*" keys with the prefix removed, or
    the whole dict when it has none (a plain backbone or torchvision file); DDP's "module." removed."""
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("backbone.") for key in state):
        state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    return state
