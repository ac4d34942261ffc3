"""ProminenceMasker: the three gradients land in the right buffers, and masking equals the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import cure_kernels as ck
from cure_kernels import reference


def _model_and_losses(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, x_adv = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    y = torch.randint(0, 3, (5,))
    out, out_adv = model(x), model(x_adv)
    loss_nat, loss_rob = F.cross_entropy(out, y), F.cross_entropy(out_adv, y)
    return model, loss_nat, loss_rob, loss_nat + 0.5 * loss_rob + out.square().mean()


def test_capture_routes_each_backward_into_its_buffer():
    model, loss_nat, loss_rob, loss = _model_and_losses()
    params = list(model.parameters())
    g_nat = torch.autograd.grad(loss_nat, params, retain_graph=True)
    g_rob = torch.autograd.grad(loss_rob, params, retain_graph=True)
    g_all = torch.autograd.grad(loss, params, retain_graph=True)
    masker = ck.ProminenceMasker(params, alpha=0.1, p=0.3)
    masker.zero_grad()
    with masker.capture("nat"):
        loss_nat.backward(retain_graph=True)
    with masker.capture("adv"):
        loss_rob.backward(retain_graph=True)
    loss.backward()
    for q, expected, view in zip(params, g_all, masker.updates):
        assert q.grad.data_ptr() == view.data_ptr()  # .grad is still a view of the flat buffer
        torch.testing.assert_close(q.grad, expected)
    for got, exp in zip(masker.grads_nat, g_nat):
        torch.testing.assert_close(got, exp)
    for got, exp in zip(masker.grads_adv, g_rob):
        torch.testing.assert_close(got, exp)
    assert len(masker.buffers["nat"][torch.float32]) == sum(q.numel() for q in params)


def test_mask_equals_reference_and_keep_masks_agree():
    model, loss_nat, loss_rob, loss = _model_and_losses(1)
    masker = ck.ProminenceMasker(model.parameters(), alpha=0.2, p=0.4)
    masker.zero_grad()
    with masker.capture("nat"):
        loss_nat.backward(retain_graph=True)
    with masker.capture("adv"):
        loss_rob.backward(retain_graph=True)
    loss.backward()
    expected = [q.grad.clone() for q in masker.params]
    reference.rgp_mask_reference(expected, masker.grads_nat, masker.grads_adv, 0.2, 0.4)
    keeps, keep_stats = masker.keep_masks()
    unmasked = [q.grad.clone() for q in masker.params]
    stats = masker.mask_()
    for q, e, k, u in zip(masker.params, expected, keeps, unmasked):
        assert torch.equal(q.grad, e)
        assert torch.equal(q.grad, u * k)  # keep masks select exactly the entries mask_ kept
    assert torch.equal(stats.kept, keep_stats.kept)


def test_zero_grad_after_optimizer_zero_grad_restores_views():
    model, _, _, loss = _model_and_losses(2)
    masker = ck.ProminenceMasker(model.parameters(), alpha=0.1, p=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()  # set_to_none=True drops our views ...
    assert all(q.grad is None for q in masker.params)
    masker.zero_grad()  # ... and this puts them back
    assert all(q.grad.data_ptr() == v.data_ptr() for q, v in zip(masker.params, masker.updates))


def test_bad_arguments():
    with pytest.raises(ValueError, match="p must be a finite number"):
        ck.ProminenceMasker(nn.Linear(2, 2).parameters(), alpha=0.1, p=1.2)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        ck.ProminenceMasker([], alpha=0.1, p=0.3)
    masker = ck.ProminenceMasker(nn.Linear(2, 2).parameters(), alpha=0.1, p=0.3)
    with pytest.raises(ValueError, match="kind must be 'nat' or 'adv'"):
        with masker.capture("rob"):
            pass


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_capture_with_create_graph_and_several_parameters_per_dtype():
    """With create_graph=True autograd replaces .grad out of place; the values still land in the buffers."""
    model, loss_nat, loss_rob, loss = _model_and_losses(3)
    params = list(model.parameters())  # four float32 parameters
    g_nat = torch.autograd.grad(loss_nat, params, retain_graph=True)
    g_rob = torch.autograd.grad(loss_rob, params, retain_graph=True)
    masker = ck.ProminenceMasker(params, alpha=0.1, p=0.3)
    masker.zero_grad()
    with masker.capture("nat"):
        loss_nat.backward(create_graph=True, retain_graph=True)
    with masker.capture("adv"):
        loss_rob.backward(create_graph=True, retain_graph=True)
        loss_rob.backward(create_graph=True, retain_graph=True)  # accumulates: twice the gradient
    for q, view in zip(params, masker.updates):
        assert q.grad is view and not q.grad.requires_grad and not q.grad.any()
    for got, nat, adv, rob in zip(masker.grads_nat, g_nat, masker.grads_adv, g_rob):
        assert not got.requires_grad and not adv.requires_grad
        torch.testing.assert_close(got, nat)
        torch.testing.assert_close(adv, 2 * rob)
    loss.backward()  # the update gradient still accumulates into the flat buffer
    assert all(q.grad is view and q.grad.any() for q, view in zip(params, masker.updates))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_capture_restores_grad_when_the_backward_raises():
    model, loss_nat, loss_rob, _ = _model_and_losses(4)
    params = list(model.parameters())
    g_rob = torch.autograd.grad(loss_rob, params, retain_graph=True)
    masker = ck.ProminenceMasker(params, alpha=0.1, p=0.3)
    masker.zero_grad()
    loss_nat.backward()  # frees the graph: a second backward raises
    updates = [q.grad.clone() for q in params]
    for create_graph in (False, True):
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            with masker.capture("adv"):
                loss_rob.backward(create_graph=create_graph, retain_graph=True)  # lands in the buffers ...
                loss_nat.backward(create_graph=create_graph)  # ... then this raises
        for q, view, before in zip(params, masker.updates, updates):
            assert q.grad is view and torch.equal(q.grad, before)
        for got, expected in zip(masker.grads_adv, g_rob):  # the captures accumulate: one more each time
            torch.testing.assert_close(got, expected * (1 + int(create_graph)))


def test_backend_is_checked_at_construction():
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ck.ProminenceMasker(params, alpha=0.1, p=0.3, backend="nope")
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        ck.ProminenceMasker(params, alpha=0.1, p=0.3, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a string"):
        ck.ProminenceMasker(params, alpha=0.1, p=0.3, backend=None)


def test_numpy_scalars_are_accepted():
    masker = ck.ProminenceMasker(nn.Linear(2, 2).parameters(), alpha=np.float32(0.1), p=np.float32(0.3))
    assert masker.p == float(np.float32(0.3)) and type(masker.alpha) is float


@pytest.mark.parametrize("create_graph", [False, True])
def test_captures_accumulate_over_micro_batches_until_zero_grad(create_graph):
    """Gradient accumulation: two micro-batches captured one after the other hold the sum of their gradients
    (bit for bit the sum of the separate gradients on the CPU, like .grad), for all three kinds;
    zero_grad clears all three."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    params = list(model.parameters())
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    noise = [torch.randn(4, 6) * 0.1 for _ in range(2)]

    def losses(i):
        x, y = batches[i]
        nat, adv = model(x), model(x + noise[i])
        loss_nat, loss_rob = F.cross_entropy(nat, y), F.cross_entropy(adv, y)
        return loss_nat, loss_rob, loss_nat + 2.0 * loss_rob

    separate = {k: [] for k in ("nat", "adv", "update")}
    for i in range(2):
        for kind, loss in zip(("nat", "adv", "update"), losses(i)):
            separate[kind].append(torch.autograd.grad(loss, params, retain_graph=True))
    masker = ck.ProminenceMasker(params, alpha=0.1, p=0.3)
    masker.zero_grad()
    for i in range(2):
        loss_nat, loss_rob, loss = losses(i)
        with masker.capture("nat"):
            loss_nat.backward(retain_graph=True, create_graph=create_graph)
        with masker.capture("adv"):
            loss_rob.backward(retain_graph=True, create_graph=create_graph)
        loss.backward()
    for kind, got in (("nat", masker.grads_nat), ("adv", masker.grads_adv), ("update", [q.grad for q in params])):
        for g, a, b in zip(got, *separate[kind]):
            assert torch.equal(g.detach(), a + b), kind
    masker.zero_grad()
    for t in [*masker.grads_nat, *masker.grads_adv, *masker.updates]:
        assert not t.any()


def test_the_same_parameter_twice_is_refused_when_the_masker_is_built():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] are the same parameter"):
        ck.ProminenceMasker([lin.weight, lin.bias, lin.weight], alpha=0.1, p=0.3)


def test_converting_the_model_after_building_the_masker_is_named_at_the_next_step():
    model = nn.Linear(3, 2)
    masker = ck.ProminenceMasker(model.parameters(), alpha=0.1, p=0.3)
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"params\[0\] is now torch.bfloat16 .* built for torch.float32"):
        masker.zero_grad()
    with pytest.raises(RuntimeError, match="Build the masker after model.to"):
        with masker.capture("nat"):
            pass
