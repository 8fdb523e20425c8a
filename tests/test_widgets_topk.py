"""Chapter 05's widgets, driven programmatically: set values, click, check what changed."""
import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from tutorial_moe.experiments.brainy import brainy_moe, train_schedule
from tutorial_moe.book.widgets.topk import (RetrainPanel, TopKExplorer, parse_schedule, table_from_runs,
                                       topk_animation)

S = 6


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, S, S, generator=g)
    # a learnable label: which quarter of the image is brightest, so accuracy really depends on k
    y = x[:, 0].reshape(n, -1).argmax(-1) % 10
    return x, y


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = {}
    for label, seeds in (("a", (0, 1)), ("b", (2,))):
        group = []
        for s in seeds:
            torch.manual_seed(s)
            m = brainy_moe(4, 5, k=2, image_size=S)
            with torch.no_grad():  # distinct, sharp gates so that utilisation differs across k
                m.router.gate.net.weight.mul_(200)
            group.append(m)
        out[label] = group
    return out


def params(models):
    return [p.detach().clone() for group in models.values() for m in group for p in m.parameters()]


@pytest.mark.parametrize("draw", [False, True])
def test_explorer_slider_reevaluates_without_training(models, draw):
    test = images(64, seed=5)
    before = params(models)
    ex = TopKExplorer(models, test, k=2, draw=draw)
    first = dict(ex.state)
    assert first["k"] == 2 and first["label"] == "a" and len(first["acc"]) == 2
    assert sorted(first["curve"]) == [1, 2, 3, 4]
    ex.k_slider.value = 4
    assert ex.state["k"] == 4
    # at k = E every expert takes every image: utilisation is exactly uniform; at k = 2 it was not
    assert ex.state["utilization_mean"] == pytest.approx([0.25] * 4, abs=1e-4)
    assert first["utilization_mean"] != pytest.approx([0.25] * 4, abs=1e-3)
    assert ex.state["acc_mean"] == pytest.approx(first["curve"][4])
    ex.regime.value = "b"
    assert ex.state["label"] == "b" and len(ex.state["acc"]) == 1
    # no retraining: every parameter is unchanged, and the models keep their own k
    for p, q in zip(before, params(models)):
        assert torch.equal(p, q)
    assert all(m.router.k == 2 for group in models.values() for m in group)
    if draw:
        assert ex.figure is not None and len(ex.figure.axes) == 2


def test_explorer_caches_evaluations(models):
    ex = TopKExplorer(models, images(32, seed=6), k=1, draw=False)
    n = ex.evaluations
    assert n == 2 * 4  # label "a": two models at every k for the curve
    ex.k_slider.value = 3
    ex.k_slider.value = 1
    assert ex.evaluations == n  # every (label, k) of "a" was already cached


def test_explorer_bad_input(models):
    test = images(8)
    with pytest.raises(TypeError, match="models"):
        TopKExplorer([], test)
    with pytest.raises(ValueError, match="k=9"):
        TopKExplorer(models, test, k=9)
    with pytest.raises(TypeError, match="top-k"):
        TopKExplorer({"x": [torch.nn.Linear(2, 2)]}, test)
    with pytest.raises(ValueError, match="same number of experts"):
        TopKExplorer({"x": [brainy_moe(2, 3, k=1, image_size=S)], "y": [brainy_moe(3, 3, k=1, image_size=S)]}, test)
    with pytest.raises(TypeError, match="test"):
        TopKExplorer(models, (torch.rand(3, 1, S, S),))


def test_parse_schedule():
    assert parse_schedule("6,5,4,3", 6) == [6, 5, 4, 3]
    assert parse_schedule(" 3, 3 3 ", 6) == [3, 3, 3]
    for bad in ("", "7", "0,3", "a,3", "3.5"):
        with pytest.raises(ValueError):
            parse_schedule(bad, 6)
    with pytest.raises(TypeError):
        parse_schedule([6, 3], 6)


@pytest.mark.parametrize("draw", [False, True])
def test_retrain_button_trains_with_the_chosen_schedule(draw):
    train, test = images(96, seed=1), images(32, seed=2)
    panel = RetrainPanel(train, test, num_experts=4, hidden=4, draw=draw, batch_size=32,
                         presets={"all": "4,4", "sparse": "2,2,1"})
    assert panel.result is None and panel.schedule.value == "4,4"
    panel.button.click()
    first = panel.result
    assert [e["k"] for e in first.history.epochs] == [4, 4] and first.model.router.k == 4
    panel.preset.value = "sparse"
    assert panel.schedule.value == "2,2,1"
    panel.button.click()
    assert panel.result is not first and len(panel.runs) == 2
    assert [e["k"] for e in panel.result.history.epochs] == [2, 2, 1]
    assert "trained" in panel.message.value
    if draw:
        assert panel.figure is not None


def test_retrain_button_reports_a_bad_schedule():
    train, test = images(16, seed=1), images(8, seed=2)
    panel = RetrainPanel(train, test, num_experts=4, hidden=2, draw=False, presets={"p": "4"})
    panel.schedule.value = "9,1"
    panel.button.click()
    assert panel.result is None and "Not trained" in panel.message.value and "1..4" in panel.message.value
    with pytest.raises(ValueError, match="'9'"):
        RetrainPanel(train, test, num_experts=4, presets={"bad": "9"})


def test_table_and_animation():
    train, test = images(48, seed=1), images(16, seed=2)
    runs = {"g": [train_schedule([3, 2], train, test, num_experts=3, hidden=3, image_size=S, batch_size=16, seed=s)
                  for s in (0, 1)]}
    table = table_from_runs(runs)
    assert sorted(table["g"]) == [1, 2, 3] and len(table["g"][2]["acc"]) == 2
    assert table["g"][2]["acc"] == [r.at_k[2]["acc"] for r in runs["g"]]
    html = topk_animation(table)
    assert "<script" in html and html.count("data:image/png;base64") == 3  # one frame per k
    with pytest.raises(TypeError):
        topk_animation({})
    with pytest.raises(TypeError):
        table_from_runs({})
