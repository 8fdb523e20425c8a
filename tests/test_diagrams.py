"""tutorial_moe.book.diagrams: the MoE data-flow diagram draws what it is given (Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tutorial_moe.book.diagrams import default_choices, moe_flow_diagram  # noqa: E402
from tutorial_moe.book.style import expert_color  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _patches(fig, prefix):
    return {p.get_gid(): p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith(prefix)}


def test_one_box_per_expert_in_its_book_colour_and_idle_experts_faded():
    fig = moe_flow_diagram(num_experts=5, k=2, num_tokens=2, choices=[[0, 3], [3, 1]])
    boxes = _patches(fig, "expert-")
    assert sorted(boxes) == [f"expert-{e}" for e in range(5)]
    for e, patch in boxes.items():
        i = int(e.split("-")[1])
        assert mcolors.same_color(patch.get_facecolor()[:3], mcolors.to_rgb(expert_color(i)))
    faded = {int(g.split("-")[1]) for g, p in boxes.items() if p.get_alpha() < 0.5}
    assert faded == {2, 4}  # the experts no token chose


def test_one_dispatch_arrow_per_token_and_chosen_expert_in_that_experts_colour():
    choices = torch.tensor([[2, 0], [1, 2], [0, 1]])
    fig = moe_flow_diagram(num_experts=3, k=2, num_tokens=3, choices=choices, weights=[[0.6, 0.4]] * 3)
    arrows = _patches(fig, "dispatch-")
    assert sorted(arrows) == sorted(f"dispatch-{t}-{e}" for t, row in enumerate(choices.tolist()) for e in row)
    for gid, patch in arrows.items():
        e = int(gid.split("-")[2])
        assert mcolors.same_color(patch.get_edgecolor()[:3], mcolors.to_rgb(expert_color(e)))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("0.60") == 3 and texts.count("0.40") == 3


def test_draws_into_a_given_axes():
    fig, ax = plt.subplots()
    assert moe_flow_diagram(ax=ax) is fig
    assert len(_patches(fig, "expert-")) == 4


@pytest.mark.parametrize("E,k,T", [(4, 2, 3), (8, 2, 4), (3, 3, 2), (6, 1, 5)])
def test_default_choices_are_k_distinct_valid_experts_and_leave_one_idle_when_possible(E, k, T):
    rows = default_choices(T, E, k)
    assert len(rows) == T and all(len(set(r)) == k and all(0 <= e < E for e in r) for r in rows)
    if E > k:
        assert E - 1 not in {e for r in rows for e in r}


@pytest.mark.parametrize("kwargs,error,words", [
    ({"num_experts": 0}, ValueError, "num_experts=0"),
    ({"num_experts": 2.0}, TypeError, "num_experts"),
    ({"k": 5}, ValueError, "k=5"),
    ({"num_tokens": 9}, ValueError, "num_tokens=9"),
    ({"choices": [[0, 1]]}, ValueError, "shape (3, 2)"),
    ({"choices": [[0, 0], [1, 2], [2, 3]]}, ValueError, "twice"),
    ({"choices": [[0, 4], [1, 2], [2, 3]]}, ValueError, "0..3"),
    ({"choices": 7}, TypeError, "choices"),
    ({"weights": [[0.5, 0.5]]}, ValueError, "weights"),
    ({"weights": [[1.5, 0.5]] * 3}, ValueError, "[0, 1]"),
])
def test_bad_input_names_the_argument(kwargs, error, words):
    with pytest.raises(error, match=None) as info:
        moe_flow_diagram(**kwargs)
    assert words in str(info.value)
