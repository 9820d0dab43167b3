import pytest
import torch

from uda.engine import seed_everything, train_steps
from uda.schedule import Schedule, set_lr
from uda.errors import UdaError
from uda.runlog import RunDir, atomic_save, read_metrics
from uda.config import load_config


def test_warmup_step_schedule_equals_formula():
    s = Schedule(base_lr=3.5e-4, warmup_epochs=10, warmup_from=3.5e-5, milestones=(40, 70), gamma=0.1)
    expected = {0: 3.5e-5, 5: 3.5e-5 + (3.5e-4 - 3.5e-5) * 0.5, 10: 3.5e-4, 39: 3.5e-4, 40: 3.5e-5, 69: 3.5e-5, 70: 3.5e-6, 119: 3.5e-6}
    for epoch, lr in expected.items():
        assert s.lr(epoch) == pytest.approx(lr, rel=1e-12), epoch


def test_cosine_schedule_after_warmup():
    s = Schedule(base_lr=1.0, warmup_epochs=2, warmup_from=0.1, kind="cosine", epochs=12)
    assert s.lr(1) == pytest.approx(0.55)
    assert s.lr(2) == pytest.approx(1.0)
    assert s.lr(7) == pytest.approx(0.5)
    assert s.lr(12) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UdaError, match="unknown lr schedule"):
        Schedule(kind="poly", warmup_epochs=0).lr(3)


def test_set_lr_sets_every_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 5.0}], lr=1.0)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])


def test_seed_everything_is_a_function_of_seed_and_epoch():
    seed_everything(3, 5)
    a = torch.rand(3)
    seed_everything(3, 5)
    assert torch.equal(a, torch.rand(3))
    seed_everything(3, 6)
    assert not torch.equal(a, torch.rand(3))


def test_train_steps_minimises_and_stops_on_nan():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.tensor([3.0]))
    opt = torch.optim.SGD([w], lr=0.1)
    batches = [torch.tensor([1.0])] * 20
    means = train_steps(batches, lambda b: {"sq": ((w - b) ** 2).sum()}, [opt], num_steps=20, device=torch.device("cpu"))
    assert w.item() == pytest.approx(1 + 2 * 0.8**20, rel=1e-5)  # w <- w - 0.1 * 2 (w - 1)
    assert 0 < means["sq"] < 4.0
    with pytest.raises(UdaError, match="non-finite loss at step 0"):
        train_steps([torch.tensor([float("nan")])], lambda b: {"sq": ((w - b) ** 2).sum()}, [opt], num_steps=1, device=torch.device("cpu"))
    with pytest.raises(UdaError, match="no batch"):
        train_steps([], lambda b: {}, [opt], num_steps=0, device=torch.device("cpu"))


def test_a_finite_divergence_stops_the_epoch_and_names_the_lr():
    """Adam at lr 1e6 moves every weight by ~1e6 a step: losses stay finite (~1e13) but useless."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10))
    opt = torch.optim.Adam([w], lr=1e6)
    batches = [torch.randn(10) for _ in range(5)]
    with pytest.raises(UdaError) as info:
        train_steps(batches, lambda b: {"sq": ((w - b) ** 2).sum()}, [opt], num_steps=5, device=torch.device("cpu"))
    message = str(info.value)
    assert "diverging: at step 0" in message and "lr: 1e+06" in message and "new --output-dir" in message
    healthy = torch.optim.Adam([w], lr=1e-2)  # the same problem at a sane lr trains through
    w.data = torch.randn(10)
    train_steps(batches * 10, lambda b: {"sq": ((w - b) ** 2).sum()}, [healthy], num_steps=50, device=torch.device("cpu"))


def test_run_dir_writes_config_metrics_and_refuses_overwrite(tmp_path):
    cfg = load_config({"seed": 1, "optim": {"lr": 0.1}})
    run = RunDir(tmp_path / "run", cfg)
    run.log("hello")
    run.log_metrics(2, {"market": {"mAP": 0.5, "rank1": 0.75, "cmc": [0.75, 0.8]}})
    run.save_checkpoint({"epoch": 2, "w": torch.ones(2)})
    run.close()
    assert "seed: 1" in (tmp_path / "run" / "config.yaml").read_text()
    assert "hello" in (tmp_path / "run" / "log.txt").read_text()
    assert read_metrics(tmp_path / "run") == [{"epoch": 2, "market": {"mAP": 0.5, "rank1": 0.75, "cmc": [0.75, 0.8]}}]
    assert list((tmp_path / "run" / "tb").iterdir())
    with pytest.raises(UdaError, match="--resume"):
        RunDir(tmp_path / "run", cfg)
    resumed = RunDir(tmp_path / "run", cfg, resume=True)
    assert resumed.load_checkpoint()["epoch"] == 2
    resumed.close()
    (tmp_path / "run" / "last.pth").write_bytes(b"garbage")
    with pytest.raises(UdaError, match=r"no readable checkpoint in .*run \(last.pth\); delete them to restart the run"):
        RunDir(tmp_path / "run", cfg, resume=True).load_checkpoint()


def test_atomic_save_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_save({"v": 1}, path)

    def broken_save(obj, handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_resume_refuses_another_experiment_and_logs_allowed_changes(tmp_path):
    cfg = load_config({"seed": 1, "optim": {"lr": 0.1, "epochs": 2}, "data": {"root": "a"}})
    run = RunDir(tmp_path / "run", cfg)
    run.save_checkpoint({"epoch": 1})
    run.close()
    with pytest.raises(UdaError, match=r"optim.lr: 0.1 -> 0.2.*seed: 1 -> 2"):
        RunDir(tmp_path / "run", load_config(cfg, None, ["optim.lr=0.2", "seed=2"]), resume=True)
    assert "lr: 0.1" in (tmp_path / "run" / "config.yaml").read_text()  # a refused resume leaves the record alone
    moved = RunDir(tmp_path / "run", load_config(cfg, None, ["data.root=b", "optim.epochs=4"]), resume=True)
    moved.close()
    assert "resumed with changed settings: data.root 'a' -> 'b', optim.epochs 2 -> 4" in (tmp_path / "run" / "log.txt").read_text()
    assert "epochs: 4" in (tmp_path / "run" / "config.yaml").read_text()
