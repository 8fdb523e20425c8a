"""Chapter 07's gate-loss explorer, driven programmatically (no browser, no training)."""
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import pytest

from tutorial_moe.book.widgets.gate_losses import (
    LOSS_KINDS, GateLossExplorer, GateLossGrid, grid_animation, grid_key, nearest_value, plot_setting,
)

ALPHAS, BETAS = [0, 0.1, 1.0], [0, 0.01]


def fake_result(kind, alpha, beta):
    """A stand-in for RunResult whose digits-row NN0 rate encodes the setting (to check lookups)."""
    code = round(0.1 + 0.5 * alpha + 3 * beta + 0.01 * LOSS_KINDS.index(kind), 6)
    rates = [[code, 1 - code], [0.3, 0.7]]
    return SimpleNamespace(setting=(kind, alpha, beta), rates={"train": rates, "test": rates},
                           step_epochs=[0.5, 1.0, 1.5, 2.0], train_acc_steps=[0.1, 0.2, 0.3, 0.4],
                           test_acc_epochs=[0.25, 0.45], test_acc=0.45)


class CountingTrainer:
    def __init__(self):
        self.calls = []

    def __call__(self, kind, alpha, beta):
        self.calls.append((kind, alpha, beta))
        return fake_result(kind, alpha, beta)


@pytest.fixture
def grid():
    return GateLossGrid.compute(fake_result, ALPHAS, BETAS, kinds=("entropy", "variance"), show_progress=False)


def test_grid_key_merges_the_zero_setting_and_validates():
    assert grid_key("variance", 0, 0) == grid_key("entropy", 0.0, 0.0)
    assert grid_key("variance", 0.1, 0) != grid_key("entropy", 0.1, 0)
    # alpha = 0: both variance readings keep only the same sample term, so they are one model
    from tutorial_moe.experiments.two_domains import seed_gate_losses

    assert grid_key("variance_samples", 0, 0.01) == grid_key("variance_literal", 0, 0.01)
    nonzero = [{k: w for k, w in seed_gate_losses(kind, 0.0, 0.01).items() if w}
               for kind in ("variance_samples", "variance_literal")]
    assert nonzero[0] == nonzero[1]
    assert grid_key("variance_samples", 0.1, 0.01) != grid_key("variance_literal", 0.1, 0.01)
    with pytest.raises(ValueError, match="kind"):
        grid_key("kl", 0.1, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        grid_key("entropy", -0.1, 0.1)
    with pytest.raises(ValueError, match="beta"):
        grid_key("entropy", 0.1, float("nan"))


@pytest.mark.parametrize("value, expected", [(0.05, 0.1), (0.004, 0.0), (0.0, 0.0), (0.5, 1.0), (0.2, 0.1),
                                             (7.0, 1.0), (0.1, 0.1)])
def test_nearest_value_on_a_log_scale(value, expected):
    assert nearest_value(value, ALPHAS) == expected


def test_compute_trains_each_distinct_point_once():
    trainer = CountingTrainer()
    grid = GateLossGrid.compute(trainer, ALPHAS, BETAS, kinds=("entropy", "variance"), show_progress=False)
    # 2 kinds x 6 points, with (0, 0) shared by both kinds
    assert len(trainer.calls) == len(set(trainer.calls)) == 11 == len(grid)
    assert grid["variance", 0, 0] is grid["entropy", 0, 0]
    assert grid["variance", 1.0, 0.01].setting == ("variance", 1.0, 0.01)
    with pytest.raises(KeyError, match="alpha=0.5"):
        grid["entropy", 0.5, 0.01]
    with pytest.raises(TypeError, match="train_fn"):
        GateLossGrid.compute("not a function", ALPHAS, BETAS)


def test_known_results_are_not_trained_again():
    trainer = CountingTrainer()
    known = {("entropy", 0, 0): fake_result("entropy", 0, 0), ("entropy", 0.1, 0.01): fake_result("entropy", 0.1, 0.01)}
    grid = GateLossGrid.compute(trainer, ALPHAS, BETAS, kinds=("entropy",), known=known, show_progress=False)
    assert len(grid) == 6 and len(trainer.calls) == 4
    assert ("entropy", 0.1, 0.01) not in trainer.calls and grid.missing() == []
    assert grid.fill(trainer, show_progress=False) == 0


def test_slider_moves_answer_from_the_grid(grid):
    ex = GateLossExplorer(grid)
    assert ex.shown_key == ("entropy", 0.1, 0.01) and ex.shown_exact  # starts at the seed's setting
    ex.alpha.value = 1.0
    assert ex.shown_key == ("entropy", 1.0, 0.01) and ex.shown_exact
    assert f"{fake_result('entropy', 1.0, 0.01).rates['test'][0][0]:.3g}" in ex.table_text
    ex.kind.value = "variance"
    assert ex.shown_key == ("variance", 1.0, 0.01)
    ex.alpha.value = 0.4  # off the grid: nearest precomputed point, flagged as not exact
    assert ex.shown_key == ("variance", 1.0, 0.01) and not ex.shown_exact
    assert "nearest" in ex.status.value
    assert ex.button.disabled  # no retrain function given


def test_retrain_button_trains_exactly_the_slider_setting(grid):
    trainer = CountingTrainer()
    ex = GateLossExplorer(grid, retrain_fn=trainer)
    ex.alpha.value, ex.beta.value = 0.4, 0.005
    assert not ex.shown_exact
    ex.button.click()
    kind, alpha, beta = trainer.calls[-1]
    assert kind == "entropy" and alpha == pytest.approx(0.4) and beta == pytest.approx(0.005)
    assert ex.shown_exact and ex.shown_key == grid_key("entropy", 0.4, 0.005)
    assert grid_key("entropy", 0.4, 0.005) in grid
    assert not ex.button.disabled
    # moving away and back shows the retrained setting without training again
    ex.alpha.value = 1.0
    ex.alpha.value = 0.4
    assert ex.shown_exact and len(trainer.calls) == 1


def test_explorer_rejects_bad_input(grid):
    with pytest.raises(TypeError, match="grid"):
        GateLossExplorer({"entropy": 1})
    with pytest.raises(ValueError, match="no results"):
        GateLossExplorer(GateLossGrid(ALPHAS, BETAS))
    with pytest.raises(TypeError, match="retrain_fn"):
        GateLossExplorer(grid, retrain_fn=3)
    with pytest.raises(RuntimeError, match="retrain_fn"):
        GateLossExplorer(grid).retrain()


def test_static_views(grid):
    fig = plot_setting(grid["entropy", 0.1, 0.01], ("entropy", 0.1, 0.01))
    assert len(fig.axes) == 3 and "alpha = 0.1" in fig._suptitle.get_text()
    anim = grid_animation(grid, keys=[("entropy", 0, 0), ("entropy", 1.0, 0.01)])
    html = anim.to_jshtml()
    assert html.count("data:image/png;base64") == 2  # one embedded frame per grid point
    with pytest.raises(ValueError, match="none of the requested"):
        grid_animation(grid, keys=[("entropy", 0.5, 0.5)])
