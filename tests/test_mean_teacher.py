"""adapt.teacher_momentum: the mean teacher's soft losses against brute-force values, its temporal average,
and a tiny adaptation whose teacher is what is clustered, evaluated and saved."""
import math

import pytest
import torch
import torch.nn.functional as F

from uda.adapt import ema_update
from uda.losses import soft_cross_entropy, soft_triplet_loss

from tests.test_adapt import run_adapt


def test_soft_cross_entropy_by_hand():
    student, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])  # teacher probabilities 1/4, 3/4
    # -(1/4 log(e / (1 + e)) + 3/4 log(1 / (1 + e))) = log(1 + e) - 1/4
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(math.log(1 + math.e) - 0.25, abs=1e-6)
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 6, 2, 2])
    assert soft_cross_entropy(logits, 60.0 * F.one_hot(labels, 7)).item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)


def test_soft_triplet_loss_equals_a_brute_force_on_planted_points():
    student = torch.tensor([[0.0], [1.0], [3.0], [7.0]], requires_grad=True)
    teacher = torch.tensor([[0.0], [2.0], [3.0], [4.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    expected = 0.0
    for a in range(4):  # the student's farthest positive and nearest negative, then both softmaxes over (-d_ap, -d_an)
        pos = max((p for p in range(4) if p != a and labels[p] == labels[a]), key=lambda p: abs(student[p, 0] - student[a, 0]))
        neg = min((n for n in range(4) if labels[n] != labels[a]), key=lambda n: abs(student[n, 0] - student[a, 0]))
        d = [abs(student[a, 0] - student[i, 0]).item() for i in (pos, neg)]
        t = [abs(teacher[a, 0] - teacher[i, 0]).item() for i in (pos, neg)]
        p = [math.exp(-x) / (math.exp(-d[0]) + math.exp(-d[1])) for x in d]
        q = [math.exp(-x) / (math.exp(-t[0]) + math.exp(-t[1])) for x in t]
        expected -= (q[0] * math.log(p[0]) + q[1] * math.log(p[1])) / 4
    loss = soft_triplet_loss(student, teacher, labels)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None  # the teacher only gives targets
    same = soft_triplet_loss(student.detach(), student.detach(), labels)  # its own targets: the entropy of its softmax
    assert same.item() > 0


def test_ema_update_averages_parameters_and_copies_buffers():
    teacher, student = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(2.0), student.weight.fill_(4.0)
        student.running_mean.fill_(5.0)
    ema_update(teacher, student, 0.75)
    assert torch.equal(teacher.weight, torch.full((2,), 2.5)) and torch.equal(teacher.running_mean, torch.full((2,), 5.0))
    assert torch.equal(student.weight, torch.full((2,), 4.0))


def test_the_teacher_follows_every_step_and_is_the_saved_model(synth_root, source_model, tmp_path):
    """A teacher of momentum ~0 is the model after its last step; one of 0.9 lags it; model_final.pth holds the teacher."""
    common = ["cluster.method=kmeans", "cluster.num_clusters=12", "optim.epochs=1", "adapt.iters=4"]
    states = {}
    for name, momentum in (("follows", 1e-7), ("lags", 0.9)):
        run_adapt(synth_root, source_model, tmp_path / name, *common, f"adapt.teacher_momentum={momentum}")
        last = torch.load(tmp_path / name / "last.pth", weights_only=False)
        final = torch.load(tmp_path / name / "model_final.pth", weights_only=False)["model"]
        teacher = {k[len("model."):]: v for k, v in last["teacher"].items() if k.startswith("model.")}
        student = {k[len("model."):]: v for k, v in last["net"].items() if k.startswith("model.")}
        assert all(torch.equal(final[k], teacher[k]) for k in final)
        states[name] = (teacher, student)
        log = (tmp_path / name / "log.txt").read_text()
        assert "target_soft_ce" in log and "target_soft_triplet" in log
    teacher, student = states["follows"]
    assert all(torch.allclose(teacher[k].float(), student[k].float(), atol=1e-5) for k in student)
    teacher, student = states["lags"]
    assert any(not torch.allclose(teacher[k].float(), student[k].float(), atol=1e-4) for k in student if teacher[k].is_floating_point())
