"""Single Mixture of Experts: masks, the layer against a hand-written oracle, routing overrides,
the mask ensemble and the gradient-reach measurement."""
import pytest
import torch
import torch.nn.functional as F

from tutorial_moe.experiments.lm import DenseFFN, LMConfig, TinyLM, ffn_modules
from tutorial_moe.experiments.smoe import SMoELayer, make_masks, mask_ensemble, reach_summary, route_override, gradient_reach

TINY = LMConfig(context=12, d_model=16, n_layers=2, n_heads=2, d_hidden=24, num_experts=3)


def test_masks_keep_exactly_their_share_and_depend_only_on_the_seed():
    m = make_masks(4, 50, 0.3, seed=1)
    assert m.shape == (4, 50) and m.dtype == torch.bool
    assert (m.sum(1) == 15).all()
    assert torch.equal(m, make_masks(4, 50, 0.3, seed=1)) and not torch.equal(m, make_masks(4, 50, 0.3, seed=2))
    d = make_masks(3, 10, 0.5, disjoint=True)
    assert (d.sum(0) == 1).all() and sorted(d.sum(1).tolist()) == [3, 3, 4]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep"):
            make_masks(2, 8, bad)
    with pytest.raises(ValueError, match="num_masks <= d_hidden"):
        make_masks(9, 8, 0.5, disjoint=True)


def oracle_smoe(layer, x, ids):
    """The layer written out token by token: shared weights, the token's mask, inverted-dropout scale."""
    rows = []
    for t in range(x.shape[0]):
        mask = layer.masks[ids[t]].float()
        h = F.gelu(x[t] @ layer.fc1.weight.T + layer.fc1.bias) * mask / mask.mean()
        rows.append(h @ layer.fc2.weight.T + layer.fc2.bias)
    return torch.stack(rows)


def test_oracle_routed_layer_matches_the_hand_written_version():
    layer = SMoELayer(8, 20, 3, keep=0.4, router="oracle")
    x, ids = torch.randn(10, 8), torch.randint(3, (10,))
    assert torch.allclose(layer(x, ids), oracle_smoe(layer, x, ids), atol=1e-6)
    assert torch.allclose(layer(x.view(2, 5, 8), ids.view(2, 5)).view(10, 8), layer(x, ids), atol=1e-6)


def test_one_full_mask_is_the_dense_network():
    layer = SMoELayer(8, 20, 1, keep=1.0, router="oracle")
    dense = DenseFFN(8, 20)
    dense.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith("fc")})
    x = torch.randn(6, 8)
    assert torch.allclose(layer(x, torch.zeros(6, dtype=torch.long)), dense(x), atol=1e-6)


def test_disjoint_masks_send_no_gradient_to_other_experts_units():
    layer = SMoELayer(8, 12, 3, router="oracle", disjoint=True)
    layer(torch.randn(5, 8), torch.zeros(5, dtype=torch.long)).sum().backward()
    touched = layer.fc1.weight.grad.abs().sum(1) > 0
    assert torch.equal(touched, layer.masks[0])


def test_learned_top1_gate_learns_from_the_task():
    layer = SMoELayer(8, 16, 4, router="learned", losses={})
    layer(torch.randn(32, 8)).pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.router.parameters())
    assert layer.last_routing.mask.sum(1).eq(1).all()


def test_bad_router_and_shapes_are_refused():
    with pytest.raises(ValueError, match="router='best'"):
        SMoELayer(8, 16, 2, router="best")
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        SMoELayer(8, 16, 2)(torch.randn(3, 5))


@pytest.mark.parametrize("ffn", ["smoe", "moe"])
def test_route_override_forces_uniform_and_restores(ffn):
    model = TinyLM(TINY.replace(ffn=ffn, router="oracle")).eval()
    x = torch.randint(96, (2, 12))
    d = torch.randint(3, (2, 12))
    routers = [f.router for f in ffn_modules(model)]
    with route_override(model, 1):
        forced = model(x, d)
    assert torch.allclose(forced, model(x, torch.ones_like(d)), atol=1e-5)
    assert [f.router for f in ffn_modules(model)] == routers
    with pytest.raises(RuntimeError):
        with route_override(model, "uniform"):
            raise RuntimeError("boom")
    assert [f.router for f in ffn_modules(model)] == routers
    with pytest.raises(ValueError, match="choice"):
        with route_override(model, "best"):
            pass


def test_uniform_routing_of_one_smoe_layer_is_the_mean_of_its_masks():
    layer = SMoELayer(8, 20, 3, keep=0.5, router="oracle")
    x = torch.randn(7, 8)
    per_mask = torch.stack([layer(x, torch.full((7,), m)) for m in range(3)])
    model = torch.nn.Module()
    model.ffn = layer
    with route_override(model, "uniform"):
        avg = layer(x)
    assert torch.allclose(avg, per_mask.mean(0), atol=1e-5)


def test_full_network_inference_only_for_smoe():
    smoe = TinyLM(TINY.replace(ffn="smoe", router="oracle")).eval()
    x, d = torch.randint(96, (1, 12)), torch.randint(3, (1, 12))
    with route_override(smoe, "full"):
        assert all(f.use_all_units for f in ffn_modules(smoe))
        full = smoe(x, d)
    assert not torch.allclose(full, smoe(x, d))
    assert not any(f.use_all_units for f in ffn_modules(smoe))
    with pytest.raises(ValueError, match="needs sMoE"):
        with route_override(TinyLM(TINY.replace(ffn="moe")), "full"):
            pass


def test_mask_ensemble_averages_the_sub_networks_distributions():
    model = TinyLM(TINY.replace(ffn="smoe", router="oracle")).eval()
    x, d = torch.randint(96, (2, 12)), torch.randint(3, (2, 12))
    logp = mask_ensemble(model)(x, d)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 12), atol=1e-5)
    manual = sum(F.softmax(model(x, torch.full_like(d, m)), -1) for m in range(3)) / 3
    assert torch.allclose(logp.exp(), manual, atol=1e-5)
    with pytest.raises(ValueError, match="no MoE"):
        mask_ensemble(TinyLM(TINY))


def test_gradient_reach_dense_moe_and_smoe_against_the_routing():
    x, y = torch.randint(96, (4, 12)), torch.randint(96, (4, 12))
    d = torch.tensor([0, 0, 1, 2]).repeat_interleave(12).view(4, 12)
    share = torch.tensor([0.5, 0.25, 0.25])  # tokens of each domain

    dense = TinyLM(TINY)
    for r in gradient_reach(dense, x, y, d, max_tokens=48):
        assert torch.all(r["fc1.weight"] == 1) and torch.all(r["fc2.weight"] == 1)

    moe = TinyLM(TINY.replace(ffn="moe", router="oracle"))
    for r in gradient_reach(moe, x, y, d, max_tokens=48):
        # Expert e is reached by exactly the tokens routed to it: its domain's share.
        assert torch.allclose(r["experts.w1"].amax((1, 2)), share)
        assert torch.allclose(r["experts.w1"].amin((1, 2)), share)

    smoe = TinyLM(TINY.replace(ffn="smoe", router="oracle", keep=0.5))
    for f, r in zip(ffn_modules(smoe), gradient_reach(smoe, x, y, d, max_tokens=48)):
        expected = share @ f.masks.float()  # a unit is reached by every token whose mask keeps it
        assert torch.allclose(r["fc1.weight"].amax(1), expected)
        assert torch.allclose(r["fc2.bias"], torch.ones_like(r["fc2.bias"]))
    rows = reach_summary(smoe, gradient_reach(smoe, x, y, d, max_tokens=48), steps=10, tokens_per_step=100)
    assert len(rows) == 2 and 0 < rows[0]["mean_reach"] < 1
    assert rows[0]["token_updates_per_unit"] == pytest.approx(rows[0]["mean_reach"] * 1000)
    assert all(p.grad is None for p in smoe.parameters())  # it cleans up after itself


def test_random_router_draws_from_the_global_generator_and_covers_all_masks():
    layer = SMoELayer(8, 16, 4, router="random")
    x = torch.randn(400, 8)
    torch.manual_seed(5)
    a = layer(x)
    first = layer.last_routing.mask.clone()
    torch.manual_seed(5)
    assert torch.equal(layer(x), a) and torch.equal(layer.last_routing.mask, first)
    counts = first.sum(0)
    assert (first.sum(1) == 1).all() and (counts > 60).all()  # ~100 each of 400; 60 is > 4 sd below
    model = TinyLM(TINY.replace(ffn="moe", router="random"))
    assert type(ffn_modules(model)[0].router).__name__ == "RandomRouter"


def test_subnetwork_reach_of_the_rare_domain():
    from tutorial_moe.experiments.smoe import subnetwork_reach, unit_reach

    x, y = torch.randint(96, (4, 12)), torch.randint(96, (4, 12))
    d = torch.tensor([0, 0, 0, 1]).repeat_interleave(12).view(4, 12)  # domain 1 is rare: 1/4 of tokens
    moe = TinyLM(TINY.replace(ffn="moe", router="oracle"))
    f, r = ffn_modules(moe)[0], gradient_reach(moe, x, y, d, max_tokens=48)[0]
    assert unit_reach(f, r).shape == (3, TINY.d_hidden)
    assert subnetwork_reach(f, r, 1) == pytest.approx(0.25) and subnetwork_reach(f, r, 2) == 0
    smoe = TinyLM(TINY.replace(ffn="smoe", router="oracle", keep=0.5))
    f, r = ffn_modules(smoe)[0], gradient_reach(smoe, x, y, d, max_tokens=48)[0]
    m = f.masks.float()
    expected = float(((0.75 * m[0] + 0.25 * m[1]) * m[1]).sum() / m[1].sum())
    assert subnetwork_reach(f, r, 1) == pytest.approx(expected)
    with pytest.raises(ValueError, match="expert=3"):
        subnetwork_reach(f, r, 3)


def test_linear_cka_oracle_properties():
    from tutorial_moe.experiments.smoe import linear_cka

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)  # rotation and scale: the same
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0)  # centring removes offsets
    assert linear_cka(x, torch.randn(200, 6, generator=g)) < 0.15  # unrelated: near 0
    # A hand computation on a small case: CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).
    a, b = torch.randn(7, 2, generator=g).double(), torch.randn(7, 3, generator=g).double()
    a0, b0 = a - a.mean(0), b - b.mean(0)
    expected = (b0.T @ a0).norm() ** 2 / ((a0.T @ a0).norm() * (b0.T @ b0).norm())
    assert linear_cka(a, b) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="same N"):
        linear_cka(x, x[:10])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(x, torch.ones(200, 2))


def test_expert_hidden_matches_the_layers_own_computation():
    from tutorial_moe.experiments.smoe import expert_hidden, ffn_inputs

    model = TinyLM(LMConfig(context=8, d_model=8, n_layers=1, n_heads=2, ffn="moe", d_hidden=6,
                            num_experts=3, router="oracle"))
    tokens = torch.randint(96, (2, 8))
    doms = torch.randint(3, (2, 8))
    x = ffn_inputs(model, tokens, doms)
    assert x.shape == (16, 8)
    layer = ffn_modules(model)[0]
    hidden = expert_hidden(layer, x)
    bank = layer.experts
    routed = layer(x, doms.reshape(-1))
    for t in range(16):
        e = int(doms.reshape(-1)[t])
        # An oracle route has weight 1: the layer's output is the expert's second layer applied
        # to exactly this hidden vector.
        torch.testing.assert_close(routed[t], hidden[e][t] @ bank.w2[e] + bank.b2[e])
    smoe = SMoELayer(8, 12, 3, keep=0.5)
    parts = expert_hidden(smoe, x)
    assert [p.shape[1] for p in parts] == smoe.masks.sum(1).tolist()
