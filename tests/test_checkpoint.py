"""uda.checkpoint: both kinds of our files and a bare state dict read to the same model state; errors in one line."""
import pytest
import torch

from uda import build, checkpoint
from uda.errors import UdaError
from uda.head_policies import TrainNet
from uda.models import build_model


def small_model(seed):
    torch.manual_seed(seed)
    return build_model("resnet18_w16", "none")


def test_final_model_run_checkpoint_and_bare_state_give_the_same_model_state(tmp_path):
    model = small_model(0)
    state = model.state_dict()
    heads = {"source": build.build_classifier(_cfg(), 128, 3)}
    net = TrainNet(model, heads)
    files = {
        "final": {checkpoint.MODEL: state, checkpoint.CONFIG: {"seed": 0}},
        "last": {checkpoint.EPOCH: 3, checkpoint.NET: net.state_dict(), checkpoint.OPTIMIZER: {}, checkpoint.CONFIG: {}},
        "bare": state,
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }
    for name, content in files.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        got = checkpoint.model_state(checkpoint.read(path))
        assert got.keys() == state.keys(), name
        assert all(torch.equal(got[k], state[k]) for k in state), name
    loaded = small_model(1)
    build.load_model_weights(loaded, checkpoint.read(tmp_path / "last.pth"), tmp_path / "last.pth")
    assert torch.equal(loaded.backbone.conv1.weight, model.backbone.conv1.weight)


def _cfg():
    from uda import pretrain
    from uda.config import load_config

    return load_config(pretrain.DEFAULTS, opts=["model.backbone=resnet18_w16"])


def test_backbone_state_takes_the_backbone_part_or_the_whole_dict():
    t = torch.zeros(1)
    model_state = {"module.backbone.conv1.weight": t, "backbone.bn1.bias": t, "bnneck.weight": t}
    assert list(checkpoint.backbone_state(model_state)) == ["conv1.weight", "bn1.bias"]
    plain = {"conv1.weight": t, "fc.weight": t}
    assert list(checkpoint.backbone_state(plain)) == ["conv1.weight", "fc.weight"]


def test_unreadable_or_foreign_files_fail_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UdaError) as info:
        checkpoint.read(garbage, "source model", advice="; make it again")
    message = str(info.value)
    assert message.startswith(f"cannot read the source model {garbage}") and message.endswith("; make it again")
    assert "\n" not in message
    with pytest.raises(UdaError, match="cannot read the model .*missing.pth"):
        checkpoint.read(tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    for content, start in ((b"hello world\n", r"it starts b'hello world\n'"), (b"", "it is empty")):
        text.write_bytes(content)  # a text file said only "(KeyError: 101)"
        with pytest.raises(UdaError) as info:
            checkpoint.read(text)
        assert str(info.value) == f"cannot read the model {text}: not a torch checkpoint (neither a zip archive nor a pickle; {start})"
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(UdaError, match="holds a list, not a checkpoint"):
        checkpoint.read(listed)
    foreign = tmp_path / "foreign.pth"
    torch.save({"a": 1, "weights": torch.zeros(2)}, foreign)  # a dict, but not ours nor a state dict
    with pytest.raises(UdaError, match=r"foreign.pth holds a dict of \[a, weights\], neither a state dict nor a checkpoint"):
        checkpoint.model_state(checkpoint.read(foreign), foreign)  # read: a run's own states are any dict; a model needs one of ours
    torch.save({}, foreign)
    with pytest.raises(UdaError, match=r"holds a dict of \[\], neither"):
        checkpoint.model_state(checkpoint.read(foreign), foreign)
