"""The training loop: reproducibility, checkpoints, guards, early stopping, schedules, bookkeeping."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tutorial_moe.train as train_mod
from tutorial_moe import MoELayer
from tutorial_moe.schedules import k_per_epoch, temperature_annealing
from tutorial_moe.train import (
    History,
    collect_routing,
    evaluate,
    fit,
    load_checkpoint,
    router_parameters,
    save_checkpoint,
)

D_IN, D, E, CLASSES = 6, 8, 4, 3


class Net(nn.Module):
    """Linear in, a residual MoE block, linear out: the smallest model with a router in it."""

    def __init__(self, k=2, noisy=True, losses=None):
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.moe = MoELayer(D, D, E, k, dispatch="sorted", noisy=noisy,
                            losses={"switch": 0.01, "z": 1e-3} if losses is None else losses)
        self.out = nn.Linear(D, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    return x, y


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw)


def _steps_without_time(hist):
    return hist.steps, [{k: v for k, v in row.items() if k != "seconds"} for row in hist.epochs]


# ------------------------------------------------------------------ reproducibility
def test_fit_is_bit_identical_for_the_same_seed():
    data, test = _data(), _data(48, seed=1)
    runs = []
    for _ in range(2):
        model = _net()  # noisy router: the training noise must come from the seeded RNG too
        hist = fit(model, data, test, epochs=2, batch_size=32, lr=1e-2, seed=5, show_progress=False)
        runs.append((model, hist))
    (m1, h1), (m2, h2) = runs
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert _steps_without_time(h1) == _steps_without_time(h2)
    assert len(h1.steps) == 6 and len(h1.epochs) == 2

    other = _net()
    h3 = fit(other, data, test, epochs=2, batch_size=32, lr=1e-2, seed=6, show_progress=False)
    assert h3.steps != h1.steps  # the seed matters (so the equality above is not vacuous)


def test_history_rows_have_the_documented_fields():
    model = _net()
    hist = fit(model, _data(), _data(48, 1), epochs=1, batch_size=32, show_progress=False, clip_grad=1.0)
    row = hist.steps[0]
    for key in ("step", "epoch", "loss", "task", "train_acc", "switch", "z", "utilization", "dropped", "grad_norm"):
        assert key in row, key
    assert row["loss"] == pytest.approx(row["task"] + row["switch"] + row["z"], rel=1e-5)
    assert len(row["utilization"]) == 1 and sum(row["utilization"][0]) == pytest.approx(1.0)
    erow = hist.epochs[0]
    for key in ("epoch", "train_acc", "test_acc", "test_loss", "k", "seconds"):
        assert key in erow, key
    assert History.from_dict(hist.to_dict()).steps == hist.steps
    assert hist.series("task") == [r["task"] for r in hist.steps]


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_is_exact(tmp_path):
    model = _net()
    hist = fit(model, _data(), epochs=1, batch_size=32, show_progress=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, opt, hist, note="demo", epoch=1)

    clone = _net(seed=99)
    opt2 = torch.optim.Adam(clone.parameters(), lr=1e-2)
    hist2, meta = load_checkpoint(path, clone, opt2)
    assert meta == {"note": "demo", "epoch": 1}
    assert hist2.steps == hist.steps and hist2.epochs == hist.epochs
    for (n, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), n
    # the optimiser state came back too: one more identical step keeps them identical
    for m, o in ((model, opt), (clone, opt2)):
        m.eval()  # no router noise
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for (n, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt", _net())


# ------------------------------------------------------------------ guards
def test_non_finite_loss_raises_naming_step_and_parts():
    calls = {"n": 0}

    def poisoned(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 3 else loss

    with pytest.raises(FloatingPointError) as info:
        fit(_net(), _data(), epochs=2, batch_size=32, loss_fn=poisoned, show_progress=False)
    msg = str(info.value)
    assert "step 2" in msg and "epoch 0" in msg
    assert "task=nan" in msg and "switch=" in msg and "z=" in msg


# ------------------------------------------------------------------ early stopping
def test_early_stopping_stops_and_restores_the_best_weights():
    # A regression target: accuracy is undefined, so evaluate reports 0 every epoch; the first
    # epoch is the best and no later one beats it, so patience 2 stops after epoch 2.
    x = torch.randn(64, D)
    y = torch.tanh(x.flip(-1))
    model = nn.Sequential(MoELayer(D, 16, E, 2, dispatch="sorted"))
    snapshots = {}

    def remember(row, m):
        snapshots[row["epoch"]] = copy.deepcopy(m.state_dict())

    hist = fit(model, (x, y), (x, y), epochs=10, batch_size=16, lr=1e-2, loss_fn=F.mse_loss,
               early_stopping=2, callback=remember, show_progress=False)
    assert hist.stopped_early and hist.best_epoch == 0
    assert [r["epoch"] for r in hist.epochs] == [0, 1, 2]
    final = model.state_dict()
    assert any(not torch.equal(snapshots[2][n], snapshots[0][n]) for n in final)  # training moved on ...
    for n, v in final.items():
        assert torch.equal(v, snapshots[0][n]), n  # ... and the best epoch's weights came back


# ------------------------------------------------------------------ optimiser groups
def test_gate_lr_puts_router_parameters_in_their_own_group(monkeypatch):
    made = []
    real_adam = torch.optim.Adam

    def spy(groups, **kw):
        opt = real_adam(groups, **kw)
        made.append(opt)
        return opt

    monkeypatch.setattr(train_mod.torch.optim, "Adam", spy)
    model = _net(noisy=False)
    fit(model, _data(), epochs=1, batch_size=32, lr=1e-3, gate_lr=5e-2, show_progress=False)
    groups = made[0].param_groups
    assert len(groups) == 2
    assert groups[1]["lr"] == 5e-2 and groups[0]["lr"] == 1e-3
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.moe.router.parameters()}
    assert {id(p) for p in router_parameters(model)} == {id(model.moe.router.gate.weight)}
    assert not ({id(p) for p in groups[0]["params"]} & {id(p) for p in groups[1]["params"]})


@pytest.mark.parametrize("frozen", ["router", "rest"])
def test_gate_lr_changes_what_moves(frozen):
    # An Adam step moves a weight by about lr; with lr 1e-30 nothing representable moves.
    model = _net(noisy=False)
    before = copy.deepcopy(model.state_dict())
    lr, gate_lr = (1e-2, 1e-30) if frozen == "router" else (1e-30, 1e-2)
    fit(model, _data(), epochs=1, batch_size=32, lr=lr, gate_lr=gate_lr, show_progress=False)
    after = model.state_dict()
    router_moved = not torch.equal(before["moe.router.gate.weight"], after["moe.router.gate.weight"])
    rest_moved = not torch.equal(before["moe.experts.w1"], after["moe.experts.w1"])
    assert (router_moved, rest_moved) == ((False, True) if frozen == "router" else (True, False))


# ------------------------------------------------------------------ schedules inside fit
def test_k_schedule_is_applied_per_epoch():
    model = _net(k=3, noisy=False)
    seen = []
    fit(model, _data(), epochs=4, batch_size=32, k_schedule=k_per_epoch([3, 2, 1]), show_progress=False,
        callback=lambda row, m: seen.append((row["epoch"], m.moe.router.k,
                                             int(m.moe.last_routing.mask.sum(-1).max()))))
    assert [s for s in seen if s[0] == 0] == [(0, 3, 3)] * 3
    assert {(e, k, used) for e, k, used in seen} == {(0, 3, 3), (1, 2, 2), (2, 1, 1), (3, 1, 1)}


def test_temperature_schedule_is_applied_per_step():
    model = _net(noisy=False)
    schedule = temperature_annealing(2.0, 0.5, steps=5)
    temps = []
    fit(model, _data(), epochs=2, batch_size=32, temperature_schedule=schedule, show_progress=False,
        callback=lambda row, m: temps.append(m.moe.router.temperature))
    assert temps == pytest.approx([schedule(s) for s in range(6)])


def test_max_steps_stops_training():
    hist = fit(_net(), _data(), epochs=5, batch_size=32, max_steps=4, show_progress=False)
    assert len(hist.steps) == 4 and hist.steps[-1]["epoch"] == 1


# ------------------------------------------------------------------ train_acc definition
class Recorder(nn.Module):
    """Wraps a model; records, at each training forward, which samples it got right."""

    def __init__(self, inner, labels):
        super().__init__()
        self.inner, self.labels, self.log = inner, labels, []

    def forward(self, x, ids):
        out = self.inner(x)
        if self.training:
            self.log.append((out.argmax(-1) == self.labels[ids]).tolist())
        return out


def test_train_acc_is_accumulated_before_each_step():
    x, y = _data()
    model = Recorder(_net(), y)
    hist = fit(model, (x, y, torch.arange(len(y))), epochs=2, batch_size=20, lr=5e-2, show_progress=False)
    assert len(model.log) == len(hist.steps) == 10
    correct = seen = 0
    for row, right in zip(hist.steps, model.log):
        if row["step"] % 5 == 0:  # a new epoch starts the count again
            correct = seen = 0
        correct += sum(right)
        seen += len(right)
        assert row["train_acc"] == correct / seen, row["step"]
    assert hist.epochs[0]["train_acc"] == hist.steps[4]["train_acc"]


# ------------------------------------------------------------------ evaluate / collect_routing
def test_evaluate_restores_mode_and_counts():
    model = _net()
    model.train()
    x, y = _data()
    res = evaluate(model, (x, y), batch_size=25)
    assert model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert res["acc"] == int((out.argmax(-1) == y).sum()) / len(y)
    assert res["loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)


def test_collect_routing_concatenates_batches():
    model = _net()
    x, _ = _data()
    routing = collect_routing(model, x, batch_size=7)
    model.eval()
    with torch.no_grad():
        model(x)
    assert torch.equal(routing.mask, model.moe.last_routing.mask)
    assert torch.allclose(routing.probs, model.moe.last_routing.probs, atol=1e-6)
