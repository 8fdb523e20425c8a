"""Chapter 13/14 experiment code: equal compute by construction, exact upcycling, traces."""
from __future__ import annotations

import pytest
import torch

from tutorial_moe.experiments import modern, serving
from tutorial_moe.experiments.corpus import build_corpus
from tutorial_moe.experiments.lm import TinyLM
from tutorial_moe.upcycle import max_abs_diff


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(6_000, seed=0)


def test_every_variant_spends_the_same_expert_compute():
    counts = {v: modern.active_counts(modern.build_model(v, 0)) for v in modern.VARIANTS + modern.ACCUMULATED}
    assert len({c["macs"] for c in counts.values()}) == 1
    # parameters equal up to the extra output biases of finer experts (DeepSeekMoE's split)
    base = counts["baseline"]["total"]
    assert all(abs(c["total"] - base) / base < 0.02 for c in counts.values())


def test_variants_share_everything_but_the_ffn():
    a, b = modern.build_model("baseline", 3), modern.build_model("sigmoid_bias", 3)
    sa, sb = a.state_dict(), b.state_dict()
    shared = [k for k in sa if ".ffn." not in k]
    assert shared and all(torch.equal(sa[k], sb[k]) for k in shared)


def test_make_ffn_refuses_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        modern.make_ffn("mixtral")


def test_max_violation_by_hand():
    mask = torch.zeros(8, 4, dtype=torch.bool)
    mask[:, 0] = True  # loads 8, 0, 0, 0: mean 2, max 8
    assert modern.max_violation(mask) == pytest.approx(3.0)
    assert modern.max_violation(torch.eye(4, dtype=torch.bool)) == 0.0


def test_accumulated_training_runs_and_refuses_bad_split(corpus):
    model = modern.build_model("global", 0)
    losses = modern.train_accumulated(model, corpus.train, 2, balance="global", batch_size=8, micro_batches=4)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ValueError, match="micro_batches"):
        modern.train_accumulated(model, corpus.train, 1, balance="micro", batch_size=8, micro_batches=3)
    with pytest.raises(ValueError, match="balance"):
        modern.train_accumulated(model, corpus.train, 1, balance="local")


def test_upcycled_language_model_is_exact_at_the_copy():
    torch.manual_seed(0)
    dense = TinyLM(serving.DENSE).eval()
    up = serving.upcycle_lm(dense, 4, 2).eval()
    x = torch.randint(0, serving.DENSE.vocab_size, (4, serving.DENSE.context))
    assert max_abs_diff(dense, up, x) < 1e-5
    assert sum(p.numel() for p in up.parameters()) > sum(p.numel() for p in dense.parameters())


def test_generation_trace_records_every_new_character():
    torch.manual_seed(0)
    model = TinyLM(serving.SERVE)
    trace, text = serving.generation_trace(model, ["ab", "cd"], 5, seed=0)
    assert trace.num_steps == 10 and trace.num_layers == 2
    assert all(int(m.sum()) == serving.SERVE.k for step in trace.masks for m in step)
    assert text.startswith("ab") and len(text) == 2 + 5 + 1 + 2 + 5
