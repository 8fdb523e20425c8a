"""The tiny transformer language model: shapes, causality, parameter counts, training, evaluation,
sampling and routing collection, on tiny configurations."""
import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_moe import MoELayer
from tutorial_moe.experiments.corpus import CHAR_CLASSES, DOMAINS, build_corpus, char_classes, eval_windows
from tutorial_moe.experiments.lm import (
    DenseFFN, LMConfig, TinyLM, collect_lm_routing, evaluate_lm, ffn_modules, generate, lm_loss, parameter_counts,
    train_lm,
)
from tutorial_moe.metrics import specialization
from tutorial_moe.experiments.smoe import SMoELayer

TINY = LMConfig(context=16, d_model=16, n_layers=2, n_heads=2, d_hidden=24, num_experts=3)
KINDS = [dict(ffn="dense"), dict(ffn="moe"), dict(ffn="moe", k=2), dict(ffn="moe", router="oracle"),
         dict(ffn="smoe"), dict(ffn="smoe", router="oracle")]


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(chars_per_domain=2000, seed=0)


def batch(B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(96, (B, T), generator=g), torch.randint(3, (B, T), generator=g)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(map(str, k.values())))
def test_forward_shape_and_causality(kind):
    model = TinyLM(TINY.replace(**kind)).eval()
    x, d = batch()
    logits = model(x, d)
    assert logits.shape == (3, 16, 96)
    # Changing position 10 (its token and label) must not change any prediction before it.
    x2, d2 = x.clone(), d.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 96
    d2[:, 10] = (d2[:, 10] + 1) % 3
    logits2 = model(x2, d2)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def test_feed_forward_kind_follows_the_config():
    kinds = {"dense": DenseFFN, "moe": MoELayer, "smoe": SMoELayer}
    for name, cls in kinds.items():
        assert all(isinstance(f, cls) for f in ffn_modules(TinyLM(TINY.replace(ffn=name))))


def test_parameter_counts_match_a_hand_count():
    dense = TinyLM(TINY.replace(ffn="dense"))
    assert parameter_counts(dense) == {"total": sum(p.numel() for p in dense.parameters())} | {
        "active": sum(p.numel() for p in dense.parameters())}
    moe = TinyLM(TINY.replace(ffn="moe", k=1))
    d, h, E, L = TINY.d_model, TINY.d_hidden, TINY.num_experts, TINY.n_layers
    expert = d * h + h + h * d + d
    router = d * E  # TopKRouter's linear gate, no bias
    counts = parameter_counts(moe)
    assert counts["total"] == parameter_counts(dense)["total"] + L * ((E - 1) * expert + router)
    # One token uses one expert: active = the dense model with the same hidden width, plus the gates.
    assert counts["active"] == parameter_counts(dense)["active"] + L * router
    oracle = parameter_counts(TinyLM(TINY.replace(ffn="moe", router="oracle")))
    assert oracle == {"total": counts["total"] - L * router, "active": parameter_counts(dense)["active"]}
    smoe = TinyLM(TINY.replace(ffn="smoe", keep=0.5, router="oracle"))
    unit = d * h + h + h * d
    assert parameter_counts(smoe)["total"] == parameter_counts(dense)["total"]
    assert parameter_counts(smoe)["active"] == parameter_counts(dense)["total"] - L * unit // 2


def test_oracle_model_needs_domains():
    model = TinyLM(TINY.replace(ffn="moe", router="oracle"))
    with pytest.raises(ValueError, match="domains"):
        model(batch()[0])
    with pytest.raises(ValueError, match="domains must have shape"):
        model(batch()[0], torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds context=16"):
        TinyLM(TINY)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("bad, match", [(dict(ffn="sparse"), "ffn='sparse'"), (dict(router="hash"), "router="),
                                        (dict(n_heads=3), "divisible"), (dict(k=4), "k=4"),
                                        (dict(dropout=1.0), "dropout")])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**bad)


def test_lm_loss_is_cross_entropy_over_all_positions():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(7, (2, 5))
    manual = -sum(F.log_softmax(logits[b, t], -1)[targets[b, t]] for b in range(2) for t in range(5)) / 10
    assert torch.allclose(lm_loss(logits, targets), manual)


def test_training_learns_and_is_deterministic(corpus):
    cfg = TINY.replace(ffn="moe")
    a, b = TinyLM(cfg), TinyLM(cfg)
    b.load_state_dict(a.state_dict())
    ha = train_lm(a, corpus.train, 80, batch_size=8, lr=1e-2, seed=3, show_progress=False)
    hb = train_lm(b, corpus.train, 80, batch_size=8, lr=1e-2, seed=3, show_progress=False)
    assert ha.series("loss") == hb.series("loss")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # It starts near ln(96) = 4.56 nats a character and must get below the entropy of the
    # characters' frequencies (the best a model that ignores context can do).
    p = torch.bincount(corpus.train.tokens, minlength=96).float()
    p = p[p > 0] / p.sum()
    unigram = float(-(p * p.log()).sum())
    first, last = sum(ha.series("task")[:5]) / 5, sum(ha.series("task")[-5:]) / 5
    assert first > 4.0 and last < unigram - 0.2, (first, last, unigram)
    assert len(ha.steps[-1]["utilization"]) == 2  # one utilisation vector per MoE layer


def test_training_stops_on_a_non_finite_loss(corpus):
    model = TinyLM(TINY)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_lm(model, corpus.train, 3, batch_size=4, show_progress=False)


def test_evaluate_lm_matches_a_manual_computation(corpus):
    model = TinyLM(TINY.replace(ffn="moe", router="oracle"))
    res = evaluate_lm(model, corpus.val, max_windows=4, domain_names=DOMAINS)
    assert set(res["per_domain"]) == set(DOMAINS)
    x, y, d = eval_windows(corpus.val, 16, max_windows=4)
    with torch.no_grad():
        nll = F.cross_entropy(model(x, d).reshape(-1, 96), y.reshape(-1), reduction="none")
    for i, name in enumerate(DOMAINS):
        assert math.isclose(res["per_domain"][name], float(nll[d.reshape(-1) == i].mean()), rel_tol=1e-5)
    assert math.isclose(res["loss"], sum(res["per_domain"].values()) / 3, rel_tol=1e-6)
    # An untrained model is not far from uniform over the 96 characters.
    assert abs(res["loss"] - math.log(96)) < 1.0


def test_generate_is_seeded_and_checks_its_arguments():
    model = TinyLM(TINY)
    a = generate(model, "def ", 20, seed=1)
    assert a.startswith("def ") and len(a) == 24
    assert a == generate(model, "def ", 20, seed=1)
    assert len(generate(model, "x" * 40, 5, top_k=3)) == 45  # longer than the context: cropped, still fine
    with pytest.raises(ValueError, match="temperature"):
        generate(model, "a", 5, temperature=0)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, "", 5)
    with pytest.raises(ValueError, match="domain"):
        generate(TinyLM(TINY.replace(ffn="smoe", router="oracle")), "a", 5)


def test_collect_lm_routing_labels_line_up(corpus):
    model = TinyLM(TINY.replace(ffn="moe", k=2))
    layers = collect_lm_routing(model, corpus.val, max_windows=3, num_position_buckets=4)
    assert len(layers) == 2
    r = layers[0]
    N = 9 * 16
    assert r["mask"].shape == (N, 3) and (r["mask"].sum(1) == 2).all()
    assert torch.equal(r["char_class"], char_classes(r["token"]))
    assert r["position"].max() == 15 and torch.equal(r["position_bucket"], r["position"] // 4)
    assert int(r["char_class"].max()) < len(CHAR_CLASSES)
    oracle = TinyLM(TINY.replace(ffn="moe", router="oracle"))
    ro = collect_lm_routing(oracle, corpus.val, max_windows=3)[1]
    assert torch.equal(ro["mask"].float().argmax(1), ro["domain"])
    assert specialization(ro["mask"], ro["domain"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no MoE layer"):
        collect_lm_routing(TinyLM(TINY), corpus.val)


def test_lm_has_no_significance_rule_of_its_own():
    # Comparisons go through tutorial_moe.book.evidence.compare (the book's one protocol).
    from tutorial_moe.experiments import lm

    assert not hasattr(lm, "compare_seeds") and not hasattr(lm, "paired_difference")


def test_evaluate_lm_window_losses_average_to_the_domain_losses(corpus):
    model = TinyLM(TINY)
    res = evaluate_lm(model, corpus.val, max_windows=4, domain_names=DOMAINS)
    assert res["window_loss"].shape == (12,) and res["window_domain"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i, name in enumerate(DOMAINS):
        assert float(res["window_loss"][res["window_domain"] == i].mean()) == pytest.approx(res["per_domain"][name])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from tutorial_moe.experiments.lm import lr_at

    rates = [lr_at(s, 100, 1.0, "cosine", warmup=10, min_lr_ratio=0.1) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[10] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # monotone after warm-up
    assert lr_at(50, 100, 2.0) == 2.0  # constant by default


def test_train_lm_records_the_schedule_and_rejects_bad_values(corpus):
    model = TinyLM(TINY)
    hist = train_lm(model, corpus.train, 6, batch_size=2, lr=1e-2, schedule="cosine", warmup=2,
                    show_progress=False)
    assert [round(r, 6) for r in hist.series("lr")[:2]] == [0.005, 0.01] and hist.series("lr")[-1] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="schedule"):
        train_lm(model, corpus.train, 3, schedule="linear", show_progress=False)
    with pytest.raises(ValueError, match="warmup"):
        train_lm(model, corpus.train, 3, warmup=4, show_progress=False)


def test_train_many_equals_sequential_training_whatever_the_workers(corpus):
    from tutorial_moe.experiments.lm import train_many

    jobs = [("moe", TINY.replace(ffn="moe"), 0), ("dense", TINY, 1)]
    kw = dict(batch_size=4, lr=1e-2, show_progress=False)
    par = train_many(jobs, corpus.train, 5, val=corpus.val, workers=2, **kw)
    seq = train_many(jobs, corpus.train, 5, val=corpus.val, workers=1, **kw)
    torch.manual_seed(0)
    alone = TinyLM(jobs[0][1])
    hist = train_lm(alone, corpus.train, 5, seed=0, **kw)
    assert par[0]["history"].series("loss") == seq[0]["history"].series("loss") == hist.series("loss")
    for p, q in zip(par[0]["model"].parameters(), alone.parameters()):
        assert torch.equal(p, q)
    assert par[1]["evaluation"]["loss"] == seq[1]["evaluation"]["loss"]
    with pytest.raises(ValueError, match="jobs"):
        train_many([("x", "not a config", 0)], corpus.train, 5)


def test_shuffle_within_keeps_each_groups_counts_and_only_them():
    from tutorial_moe.experiments.lm import shuffle_within

    g = torch.Generator().manual_seed(0)
    groups = torch.randint(3, (300,), generator=g)
    # A routing that follows a hidden label beyond the group: shuffling within groups must keep
    # the per-group expert counts exactly and wipe out the hidden label's information.
    hidden = torch.randint(2, (300,), generator=g)
    mask = F.one_hot(2 * hidden + (groups > 0).long(), 4).bool()
    shuffled = shuffle_within(mask, groups, generator=g)
    for k in range(3):
        assert torch.equal(mask[groups == k].sum(0), shuffled[groups == k].sum(0))
    assert specialization(mask, hidden) > 0.5 > 0.05 > specialization(shuffled, hidden)
    with pytest.raises(ValueError, match="groups"):
        shuffle_within(mask, torch.zeros(5, dtype=torch.long))


def test_arithmetic_accuracy_scores_an_oracle_and_a_wrong_model(corpus):
    from tutorial_moe.experiments.lm import arithmetic_accuracy

    model = TinyLM(TINY)
    res = arithmetic_accuracy(model, corpus.val, num_problems=5)
    assert res["problems"] == 5 and 0 <= res["correct"] <= 5
    assert sum(n for _, n in res["by_operator"].values()) == 5
    q, given, truth = res["examples"][0]
    assert q.endswith("=") and str(eval(q[:-1])) == truth  # the true answer is the arithmetic's


def test_shared_expert_lm_counts_its_shared_expert_as_active():
    cfg = TINY.replace(ffn="shared", d_hidden=8, shared_hidden=8, num_experts=3, router="oracle")
    model = TinyLM(cfg)
    counts = parameter_counts(model)
    dense = parameter_counts(TinyLM(TINY.replace(ffn="dense", d_hidden=16)))
    # Active: shared (8 units) + one routed expert (8 units) = a dense layer of 16 units, up to
    # the second output bias each expert bank carries (d_model per layer).
    assert counts["active"] == dense["active"] + TINY.n_layers * TINY.d_model
    x, d = batch()
    assert model(x, d).shape == (3, 16, 96)
