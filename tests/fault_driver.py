"""Run a stage and SIGKILL this very process at the nth call of one function (for tests/test_faults.py).

    python tests/fault_driver.py adapt|pretrain step|clustering|checkpoint|none N ARGS...

step: the nth Adam step (the n-th training step); clustering: the nth pseudo-label round, on entry;
checkpoint: the nth checkpoint write, after half of its bytes reached the temporary file.
"""
import io
import os
import signal
import sys

import torch

from uda import adapt, pretrain, runlog


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def on_nth_call(function, nth: int, before=lambda *args: die()):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            before(*args)
        return function(*args, **kwargs)

    return wrapper


def torn_save(obj, handle) -> None:
    buffer = io.BytesIO()
    real_save(obj, buffer)
    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    die()


real_save = torch.save


def main() -> None:
    stage, point, nth, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if point == "step":
        torch.optim.Adam.step = on_nth_call(torch.optim.Adam.step, nth)
    elif point == "clustering":
        adapt.pseudo_label_round = on_nth_call(adapt.pseudo_label_round, nth)
    elif point == "checkpoint":
        saves = 0

        def atomic_save(obj, path):
            nonlocal saves
            saves += 1
            runlog.atomic_write(path, lambda handle: (torn_save if saves == nth else real_save)(obj, handle))

        runlog.atomic_save = atomic_save
    elif point != "none":
        raise SystemExit(f"unknown kill point {point}")
    {"adapt": adapt, "pretrain": pretrain}[stage].main(argv)


if __name__ == "__main__":
    main()
