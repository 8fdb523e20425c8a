"""Global-batch balancing (Qwen, arXiv 2501.11873): the loss accumulated over micro-batches equals
the Switch loss of the concatenated batch in value and gradient; the per-micro-batch mean does not."""
import pytest
import torch
import torch.nn as nn

from tutorial_moe import MoELayer, TopKRouter
from tutorial_moe.balance import GlobalBalanceLoss, choices_of
from tutorial_moe.losses import switch_balance_loss


def _switch(probs, mask):
    """E * sum_i f_i P_i written out (f: share of assignments, P: mean probability)."""
    E = probs.shape[1]
    m = mask.to(probs.dtype)
    return E * ((m.sum(0) / m.sum()) * probs.mean(0)).sum()


def _router(E=6, k=2, d=5):
    r = TopKRouter(d, E, k).double()
    with torch.no_grad():
        r.gate.weight.normal_()
    return r


@pytest.mark.parametrize("sizes", [(8, 8, 8), (3, 11, 6, 1)])
def test_accumulated_loss_equals_the_concatenated_batch(sizes):
    router = _router()
    xs = [torch.randn(n, 5, dtype=torch.float64) for n in sizes]
    acc = GlobalBalanceLoss()
    for x in xs:
        acc.add(router(x))
    loss = acc.loss()
    (g_acc,) = torch.autograd.grad(loss, router.gate.weight)

    full = router(torch.cat(xs))
    ref = _switch(full.probs, full.mask)
    (g_ref,) = torch.autograd.grad(ref, router.gate.weight)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_acc, g_ref, rtol=1e-10, atol=1e-12)
    # The package's own Switch loss agrees on the concatenated batch.
    full = router(torch.cat(xs))
    torch.testing.assert_close(loss.detach(), switch_balance_loss(full.probs, full.mask).detach(), rtol=1e-12,
                               atol=1e-12)
    assert sum(float(t.detach()) for t in acc.terms()) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert acc.num_micro_batches() == len(sizes)


def test_one_micro_batch_is_the_plain_switch_loss():
    router = _router()
    r = router(torch.randn(10, 5, dtype=torch.float64))
    acc = GlobalBalanceLoss()
    acc.add(r)
    torch.testing.assert_close(acc.loss(), _switch(r.probs, r.mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.micro_batch_loss(), acc.loss(), rtol=1e-12, atol=1e-12)


def test_micro_batch_mean_differs_when_compositions_differ():
    # Two "domains": each micro-batch's tokens all prefer different experts. Over the global batch
    # the load is balanced; inside each micro-batch it is not, so the micro-batch loss is larger.
    router = TopKRouter(2, 4, 1).double()
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[3.0, 0], [0, 3.0], [-3.0, 0], [0, -3.0]], dtype=torch.float64))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).repeat(4, 1)   # experts 0 and 1
    b = -a                                                                          # experts 2 and 3
    acc = GlobalBalanceLoss()
    acc.add(router(a))
    acc.add(router(b))
    torch.testing.assert_close(acc.frequencies(), torch.full((4,), 0.25, dtype=torch.float64))
    assert float(acc.micro_batch_loss().detach()) > float(acc.loss().detach()) + 0.1
    # Same composition in both micro-batches: the two losses agree.
    mixed = torch.cat([a[:4], b[:4]])
    same = GlobalBalanceLoss()
    same.add(router(mixed))
    same.add(router(mixed))
    torch.testing.assert_close(same.micro_batch_loss(), same.loss(), rtol=1e-12, atol=1e-12)


def test_add_model_reads_every_moe_layer_and_sums_them():
    torch.manual_seed(0)
    model = nn.Sequential(MoELayer(5, 7, 4, 2, losses={}, dispatch="loop"),
                          MoELayer(5, 7, 4, 2, losses={}, dispatch="loop")).double()
    xs = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    acc = GlobalBalanceLoss()
    for x in xs:
        model(x)
        assert acc.add_model(model) == 2
    assert acc.layers == [0, 1]
    model(torch.cat(xs))
    per_layer = [_switch(m.last_routing.probs, m.last_routing.mask) for m in model]
    torch.testing.assert_close(acc.loss(0), per_layer[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.loss(), per_layer[0] + per_layer[1], rtol=1e-12, atol=1e-12)
    params = [m.router.gate.weight for m in model]
    g_acc = torch.autograd.grad(acc.loss(), params)
    g_ref = torch.autograd.grad(per_layer[0] + per_layer[1], params)
    for a, b in zip(g_acc, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    acc.reset()
    assert acc.layers == []


def test_choices_before_capacity_are_counted_when_the_routing_has_them():
    router = TopKRouter(5, 4, 1, capacity_factor=0.5).double()
    r = router(torch.randn(16, 5, dtype=torch.float64))
    mask = choices_of(r)
    assert int(mask.sum()) == 16 if hasattr(r, "chosen_mask") else torch.equal(mask, r.mask)


@pytest.mark.parametrize("call,exc,match", [
    (lambda acc: acc.add("routing"), TypeError, "Routing"),
    (lambda acc: acc.add(_router()(torch.randn(3, 5, dtype=torch.float64)), layer=[0]), TypeError, "hashable"),
    (lambda acc: acc.loss(), ValueError, "nothing was added"),
    (lambda acc: acc.micro_batch_loss(), ValueError, "nothing was added"),
    (lambda acc: acc.frequencies(3), ValueError, "layer=3"),
    (lambda acc: acc.add_model("model"), TypeError, "nn.Module"),
    (lambda acc: acc.add_model(nn.Linear(2, 2)), ValueError, "no MoE module"),
    (lambda acc: acc.add_model(MoELayer(4, 4, 2, 1)), ValueError, "forward first"),
])
def test_bad_input_is_refused(call, exc, match):
    with pytest.raises(exc, match=match):
        call(GlobalBalanceLoss())


def test_expert_count_must_not_change_within_a_layer():
    acc = GlobalBalanceLoss()
    acc.add(_router(E=6)(torch.randn(3, 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="6 experts"):
        acc.add(_router(E=4)(torch.randn(3, 5, dtype=torch.float64)))
