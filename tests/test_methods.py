"""The step functions of cure/methods.py: each method trains; CURE's mask, revision, ablations and faults."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch.nn import functional as F

import cure.methods as methods
from cure.config import TrainConfig
from cure.data import DATASETS
from cure.methods import STEP_FUNCTIONS, build_step_context, kl_divergence
from cure.models import build_model
from cure.revision import RevisionModel, revision_decay_at
from cure_kernels import reference

SPEC = DATASETS["fashion-mnist"]


def _config(**kw) -> TrainConfig:
    base = dict(
        method="cure",
        dataset="fashion-mnist",
        arch="cnn",
        lr=0.01,
        weight_decay=5e-4,
        attack_steps=2,
        eps=0.1,
        step_size=0.05,
        alpha=0.1,
        p=0.3,
        gamma=1.0,
        beta=1.0,
        kernel_backend="auto",
    )
    base.update(kw)
    return TrainConfig(**base).validate()


def _context(cfg: TrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    module = build_model(cfg.arch, SPEC)
    return build_step_context(
        cfg, module, eps=cfg.eps, step_size=cfg.step_size, attack_seed=seed + 1, revision_seed=seed + 2
    )


def _batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + tuple(SPEC.shape), generator=g)
    y = torch.randint(0, SPEC.num_classes, (n,), generator=g)
    return x, y


def _params(module):
    return [q.detach().clone() for q in module.parameters()]


def _natural_ce(module, x, y) -> float:
    probe = copy.deepcopy(module).train()  # a copy: the probe must not touch the BatchNorm statistics
    with torch.no_grad():
        return float(F.cross_entropy(probe(x), y))


@pytest.mark.parametrize("method", ["st", "at", "trades", "cure"])
def test_every_method_trains(method):
    ctx = _context(_config(method=method))
    x, y = _batch()
    before = _params(ctx.module)
    ce_before = _natural_ce(ctx.module, x, y)
    for _ in range(5):
        result = STEP_FUNCTIONS[method](ctx, x, y)
        assert torch.isfinite(result.loss)
        assert not bool(result.skipped)
        assert 0 <= int(result.correct_nat) <= len(y) and 0 <= int(result.correct_adv) <= len(y)
    after = _params(ctx.module)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no parameter moved"
    ce_after = _natural_ce(ctx.module, x, y)
    assert ce_after < ce_before, f"{method}: natural CE on a repeated batch went {ce_before} -> {ce_after}"
    assert ctx.module.training


def test_kl_divergence_is_batchmean_kl_of_softmaxes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p, q = F.softmax(a, 1), F.softmax(b, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(kl_divergence(a, b), expected)
    assert float(kl_divergence(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def _record_cure_step(ctx, x, y, monkeypatch):
    """Run one CURE step and record x_adv, the unmasked update, the gradients the update used, and stats."""
    seen: dict = {}
    real_attack = methods.trades_pgd

    def attack(*args, **kw):
        seen["x_adv"] = real_attack(*args, **kw)
        return seen["x_adv"]

    monkeypatch.setattr(methods, "trades_pgd", attack)
    real_fused = methods.rgp_sgd_step_

    def fused(params, grads, *args, **kw):  # the masked path: conserve + SGD (+ revise) in one op
        seen["unmasked"] = [g.clone() for g in grads]
        seen["stats"] = real_fused(params, grads, *args, **kw)
        seen["grads"] = [g.clone() for g in grads]
        return seen["stats"]

    monkeypatch.setattr(methods, "rgp_sgd_step_", fused)
    real_step = ctx.optimizer.step

    def step(*args, **kw):  # the no-mask path: torch.optim.SGD
        seen["grads"] = [q.grad.clone() for q in ctx.module.parameters()]
        return real_step(*args, **kw)

    monkeypatch.setattr(ctx.optimizer, "step", step)
    seen["result"] = methods.cure_step(ctx, x, y)
    return seen


def _conserved(ctx, stats):
    """Per parameter, the entries the step conserved: score below the tensor's threshold (docs/method.md)."""
    masker = ctx.masker
    return [
        reference.rgp_scores(g_nat, g_adv, masker.alpha) < thr
        for g_nat, g_adv, thr in zip(masker.grads_nat, masker.grads_adv, stats.thresholds)
    ]


def test_cure_gradients_and_mask_equal_the_reference(monkeypatch):
    cfg = _config(p=0.4, alpha=0.2, gamma=0.7, beta=1.5)
    ctx = _context(cfg)
    x, y = _batch()
    # One warm-up step so that momentum, the revision model and BN statistics are not trivial.
    methods.cure_step(ctx, *_batch(seed=1))
    model0 = copy.deepcopy(ctx.module)
    rev0 = copy.deepcopy(ctx.revision.module)
    seen = _record_cure_step(ctx, x, y, monkeypatch)
    x_adv = seen["x_adv"]
    assert (x_adv - x).abs().max() <= cfg.eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1

    # The three gradients, recomputed with the pre-step weights (train mode; the revision model's targets in
    # train mode too, as the official code computes them).
    model0.train()
    params = list(model0.parameters())
    logits_nat, logits_adv = model0(x), model0(x_adv)
    with torch.no_grad():
        rev0.train()
        rev_nat, rev_adv = rev0(x), rev0(x_adv)
    loss_nat = F.cross_entropy(logits_nat, y)
    loss_rob = F.cross_entropy(logits_adv, y)
    loss = (
        loss_nat
        + cfg.beta * kl_divergence(logits_nat, logits_adv)
        + cfg.gamma * (kl_divergence(rev_nat, logits_nat) + kl_divergence(rev_adv, logits_adv))
    )
    g_nat = torch.autograd.grad(loss_nat, params, retain_graph=True)
    g_rob = torch.autograd.grad(loss_rob, params, retain_graph=True)
    g_all = torch.autograd.grad(loss, params)
    torch.testing.assert_close(seen["result"].loss, loss.detach())
    for got, exp in zip(ctx.masker.grads_nat, g_nat):
        torch.testing.assert_close(got, exp)
    for got, exp in zip(ctx.masker.grads_adv, g_rob):
        torch.testing.assert_close(got, exp)
    for got, exp in zip(seen["unmasked"], g_all):
        torch.testing.assert_close(got, exp)

    # The mask the trainer applied equals the oracle on the same gradients, bit for bit.
    expected = [g.clone() for g in seen["unmasked"]]
    thresholds, kept, nonfinite = reference.rgp_mask_reference(
        expected, ctx.masker.grads_nat, ctx.masker.grads_adv, cfg.alpha, cfg.p
    )
    for got, exp in zip(seen["grads"], expected):
        assert torch.equal(got, exp)
    stats = seen["stats"]
    assert torch.equal(stats.thresholds.view(torch.int32), thresholds.view(torch.int32))
    assert torch.equal(stats.kept, kept) and torch.equal(stats.nonfinite, nonfinite)
    n = sum(q.numel() for q in params)
    assert float(seen["result"].kept_fraction) == pytest.approx(int(kept.sum()) / n)
    assert int(kept.sum()) < n  # something was conserved


def test_no_mask_leaves_gradients_unmasked_and_skips_the_extra_backward_passes(monkeypatch):
    cfg = _config(no_mask=True)
    ctx = _context(cfg)
    assert ctx.masker is None and ctx.revision is not None
    calls = []
    real_backward = torch.Tensor.backward

    def counting_backward(self, *args, **kw):
        calls.append(1)
        return real_backward(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    model0, rev0 = copy.deepcopy(ctx.module), copy.deepcopy(ctx.revision.module)
    x, y = _batch()
    seen = _record_cure_step(ctx, x, y, monkeypatch)
    assert len(calls) == 1
    model0.train()
    x_adv = seen["x_adv"]
    logits_nat, logits_adv = model0(x), model0(x_adv)
    with torch.no_grad():
        rev0.train()
        rev_nat, rev_adv = rev0(x), rev0(x_adv)
    loss = (
        F.cross_entropy(logits_nat, y)
        + kl_divergence(logits_nat, logits_adv)
        + kl_divergence(rev_nat, logits_nat)
        + kl_divergence(rev_adv, logits_adv)
    )
    for got, exp in zip(seen["grads"], torch.autograd.grad(loss, list(model0.parameters()))):
        torch.testing.assert_close(got, exp)
    assert float(seen["result"].kept_fraction) == 1.0

    calls.clear()
    methods.cure_step(_context(_config()), x, y)
    assert len(calls) == 3  # with the mask: L_nat, L_rob, then L


def test_no_revision_drops_the_consistency_loss_and_the_revision_update(monkeypatch):
    cfg = _config(no_revision=True, revision_rate=1.0)
    ctx = _context(cfg)
    assert ctx.revision is None and ctx.masker is not None
    gen_state = ctx.revision_generator.get_state()
    model0 = copy.deepcopy(ctx.module)
    x, y = _batch()
    seen = _record_cure_step(ctx, x, y, monkeypatch)
    assert not seen["result"].revised
    assert torch.equal(ctx.revision_generator.get_state(), gen_state)  # no draw either
    model0.train()
    logits_nat, logits_adv = model0(x), model0(seen["x_adv"])
    loss_adv = F.cross_entropy(logits_nat, y) + kl_divergence(logits_nat, logits_adv)
    torch.testing.assert_close(seen["result"].loss, loss_adv.detach())
    for got, exp in zip(seen["unmasked"], torch.autograd.grad(loss_adv, list(model0.parameters()))):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("bn", ["batch", "ema"])
def test_revision_update_arithmetic(bn):
    """The EMA of Eq. 7 bit for bit: over the parameters only in mode "batch" (the revision model's buffers
    are its own); over the parameters and the floating-point buffers in mode "ema" (integer ones copied)."""
    torch.manual_seed(0)
    model = build_model("cnn", SPEC)
    rev = RevisionModel(model, rate=0.2, decay=0.999, backend="reference", bn=bn)
    assert not any(q.requires_grad for q in rev.module.parameters())
    # Move the model (parameters and BN buffers) away from the copy.
    model.train()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(torch.randn_like(q))
        model(torch.rand(8, *SPEC.shape))
    before = {k: v.clone() for k, v in rev.module.state_dict().items()}
    src = model.state_dict()
    decay = revision_decay_at(3, 0.999)
    assert decay == pytest.approx(0.75)
    rev.update(decay)
    after = rev.module.state_dict()
    param_names = {name for name, _ in model.named_parameters()}
    averaged = 0
    for key, value in after.items():
        if key in param_names or (bn == "ema" and value.is_floating_point()):
            averaged += 1
            expected = before[key].clone()
            reference.revise_reference([expected], [src[key]], decay)
            assert torch.equal(value, expected), key
        elif bn == "ema":
            assert torch.equal(value, src[key]), key  # integer buffers (num_batches_tracked) are copied
        else:
            assert torch.equal(value, before[key]), key  # its own buffers: the EMA leaves them alone
            if "running_" in key:
                assert not torch.equal(value, src[key]), key  # (the model's moved)
    n_float_buffers = sum(b.is_floating_point() for b in model.buffers())
    assert averaged == len(list(model.parameters())) + (n_float_buffers if bn == "ema" else 0)
    assert rev.updates == 1
    # The warm-up of the decay: d_t = min(1 - 1/(t+1), d).
    assert revision_decay_at(1, 0.999) == 0.5
    assert revision_decay_at(10_000, 0.999) == 0.999
    with pytest.raises(ValueError, match="step"):
        revision_decay_at(0, 0.999)


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_revision_draws_come_from_the_trainer_generator(rate):
    cfg = _config(revision_rate=rate)
    ctx = _context(cfg)
    twin = torch.Generator().manual_seed(2)  # _context seeds the revision generator with seed + 2
    x, y = _batch()
    flags = [methods.cure_step(ctx, x, y).revised for _ in range(8)]
    expected = [float(torch.rand((), generator=twin)) < rate for _ in range(8)]
    assert flags == expected
    assert ctx.revision.updates == sum(expected)
    assert ctx.cure_step == 8


def test_revision_moves_towards_the_model_with_the_warmed_up_decay():
    cfg = _config(revision_rate=1.0)
    ctx = _context(cfg)
    x, y = _batch()
    methods.cure_step(ctx, x, y)  # t = 1: d_1 = 0.5
    model_w = next(ctx.module.parameters()).detach()
    rev_w = next(ctx.revision.module.parameters()).detach()
    assert not torch.equal(rev_w, model_w)
    ctx2 = _context(cfg)
    w0 = next(ctx2.module.parameters()).detach().clone()
    expected = w0.clone()
    reference.revise_reference([expected], [model_w], 0.5)
    assert torch.equal(rev_w, expected)


def test_update_mode_freezes_conserved_weights_bit_for_bit():
    cfg = _config(mask_mode="update", weight_decay=5e-2)
    ctx = _context(cfg)
    methods.cure_step(ctx, *_batch(seed=3))  # momentum buffers become non-zero
    params = list(ctx.module.parameters())
    before = [q.detach().clone() for q in params]
    bufs = [ctx.optimizer.state[q]["momentum_buffer"].clone() for q in params]
    result = methods.cure_step(ctx, *_batch())
    conserved_total = moved = 0
    for q, old, old_buf, conserved in zip(params, before, bufs, _conserved(ctx, result.mask_stats)):
        conserved_total += int(conserved.sum())
        assert torch.equal(q.detach()[conserved], old[conserved])
        assert torch.equal(ctx.optimizer.state[q]["momentum_buffer"][conserved], old_buf[conserved])
        moved += int((q.detach()[~conserved] != old[~conserved]).sum())
    assert conserved_total > 0 and moved > 0
    assert conserved_total == sum(q.numel() for q in params) - int(result.mask_stats.kept.sum())

    # In "grad" mode, momentum and weight decay still move conserved weights (the official behaviour).
    ctx_g = _context(_config(mask_mode="grad", weight_decay=5e-2))
    methods.cure_step(ctx_g, *_batch(seed=3))
    before = [q.detach().clone() for q in ctx_g.module.parameters()]
    result = methods.cure_step(ctx_g, *_batch())
    conserved = _conserved(ctx_g, result.mask_stats)
    for q, z in zip(ctx_g.masker.params, conserved):
        assert bool((q.grad[z] == 0).all())  # the gradient itself is masked
    drift = sum(
        int((q.detach()[z] != old[z]).sum()) for q, old, z in zip(ctx_g.module.parameters(), before, conserved)
    )
    assert drift > 0


@pytest.mark.parametrize(
    "method, mode", [("st", "grad"), ("trades", "grad"), ("cure", "grad"), ("cure", "update")]
)
def test_non_finite_step_is_skipped_on_the_device(method, mode):
    ctx = _context(_config(method=method, mask_mode=mode))
    STEP_FUNCTIONS[method](ctx, *_batch(seed=4))
    params = list(ctx.module.parameters())
    before = [q.detach().clone() for q in params]
    bufs = [ctx.optimizer.state[q]["momentum_buffer"].clone() for q in params]
    stats = [b.clone() for b in ctx.module.buffers()]
    x, y = _batch()
    x[0, 0, 0, 0] = float("nan")
    result = STEP_FUNCTIONS[method](ctx, x, y)
    assert bool(result.skipped)
    for q, old, old_buf in zip(params, before, bufs):
        assert torch.equal(q.detach(), old)
        assert torch.equal(ctx.optimizer.state[q]["momentum_buffer"], old_buf)
    for b, old in zip(ctx.module.buffers(), stats):  # BatchNorm statistics are not poisoned either
        assert torch.equal(b, old)
    # The next good step is applied again.
    result = STEP_FUNCTIONS[method](ctx, *_batch(seed=5))
    assert not bool(result.skipped)
    assert any(not torch.equal(q.detach(), old) for q, old in zip(params, before))


@pytest.mark.parametrize("method", ["trades", "cure"])
def test_bfloat16_autocast_step_keeps_float32_losses(method):
    ctx = _context(_config(method=method, amp=True))
    x, y = _batch()
    before = _params(ctx.module)
    result = STEP_FUNCTIONS[method](ctx, x, y)
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)
    assert not bool(result.skipped)
    assert all(q.dtype == torch.float32 for q in ctx.module.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, ctx.module.parameters()))


# ------------------------------------------------------------------------------------------------
# The fused update against the unfused step it replaces.
@contextlib.contextmanager
def _freeze_conserved(ctx, keeps):
    """Mask mode "update" of the unfused step: conserved weights and momentum restored after the step."""
    params, state = ctx.masker.params, ctx.optimizer.state
    old_params = [q.detach().clone() for q in params]
    old_bufs = [state[q]["momentum_buffer"].clone() if "momentum_buffer" in state[q] else None for q in params]
    yield
    with torch.no_grad():
        for q, keep, old_p, old_b in zip(params, keeps, old_params, old_bufs):
            conserved = keep == 0
            q.copy_(torch.where(conserved, old_p, q))
            if old_b is not None:
                buf = state[q]["momentum_buffer"]
                buf.copy_(torch.where(conserved, old_b, buf))


def _unfused_cure_step(ctx, x, y):
    """The CURE step as it was before the fused update (the oracle): masker.mask_() or keep masks,
    torch.optim.SGD(fused=True), then the revision draw and RevisionModel.update (cure_kernels.revise_)."""
    cfg, masker, revision = ctx.cfg, ctx.masker, ctx.revision
    x_adv = methods.trades_pgd(
        ctx.model, x, eps=ctx.eps, step_size=ctx.step_size, steps=cfg.attack_steps, generator=ctx.attack_generator
    )
    buffers = methods._train_mode(ctx)
    ctx.zero_grad()
    logits_nat, logits_adv = ctx.model(x), ctx.model(x_adv)
    loss_nat = F.cross_entropy(logits_nat.float(), y)
    loss = loss_nat + cfg.beta * kl_divergence(logits_nat, logits_adv)
    if revision is not None:
        revision.target_mode()
        with torch.no_grad():
            rev_nat, rev_adv = ctx.revision_forward(x), ctx.revision_forward(x_adv)
        loss = loss + cfg.gamma * (kl_divergence(rev_nat, logits_nat) + kl_divergence(rev_adv, logits_adv))
    loss_rob = F.cross_entropy(logits_adv.float(), y)
    with masker.capture("nat"):
        loss_nat.backward(retain_graph=True)
    with masker.capture("adv"):
        loss_rob.backward(retain_graph=True)
    loss.backward()
    loss = loss.detach()
    bad = ~torch.isfinite(loss)
    keeps = None
    if cfg.mask_mode == "grad":
        stats = masker.mask_()
    else:
        keeps, stats = masker.keep_masks()
        torch._foreach_mul_([q.grad for q in masker.params], keeps)
    bad = bad | (stats.nonfinite.sum() > 0)
    with _freeze_conserved(ctx, keeps) if keeps is not None else contextlib.nullcontext():
        ctx.found_inf.copy_(bad)
        ctx.optimizer.step()
        with torch.no_grad():
            for buf, old in zip(ctx.module.buffers(), buffers):
                buf.copy_(torch.where(bad, old, buf))
    ctx.cure_step += 1
    revised = False
    if revision is not None:
        u = float(torch.rand((), generator=ctx.revision_generator))
        revised = revision.step(ctx.cure_step, u, rate=ctx.revision_rate)
    return loss, stats, revised


def _copy_run_state(src, dst) -> None:
    """dst takes src's weights, buffers, optimizer state (cloned), revision model, generators and t."""
    dst.module.load_state_dict(src.module.state_dict())
    opt_state = copy.deepcopy(src.optimizer.state_dict())  # load_state_dict would share the tensors
    dst.optimizer.load_state_dict(opt_state)
    if src.revision is not None:
        dst.revision.load_state_dict(copy.deepcopy(src.revision.state_dict()))
    dst.attack_generator.set_state(src.attack_generator.get_state())
    dst.revision_generator.set_state(src.revision_generator.get_state())
    dst.cure_step = src.cure_step


def _assert_close_tensors(got, exp, what):
    # One float32 rounding of the SGD arithmetic: the fused op never contracts to FMA, torch's SGD may.
    for i, (a, b) in enumerate(zip(got, exp)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=lambda m, i=i: f"{what}[{i}]: {m}")


@pytest.mark.parametrize("revision", [True, False], ids=["revision", "no-revision"])
@pytest.mark.parametrize("mask_mode", ["grad", "update"])
def test_fused_update_matches_the_unfused_step(mask_mode, revision):
    """Step by step from the same state: identical masks (thresholds bit for bit, kept counts), gradients,
    loss and revision draws; weights, momentum and the revision model equal up to float rounding. The lr
    changes every step (a scheduler writes it into the param group). In mask mode "grad" the first step
    starts the oracle's torch.optim.SGD without momentum buffers, so its own first-step rule (buf = d) is
    what the op's zero buffers are compared with."""
    cfg = _config(mask_mode=mask_mode, no_revision=not revision, revision_rate=0.6, weight_decay=5e-2,
                  momentum=0.9, p=0.35, alpha=0.2)
    fused, oracle = _context(cfg), _context(cfg, seed=7)  # different seeds: the copy below must matter
    revised_steps = 0
    for step in range(4):
        lr = 0.05 / (step + 1)
        fused.optimizer.param_groups[0]["lr"] = lr
        _copy_run_state(fused, oracle)
        if step == 0 and mask_mode == "grad":
            # torch's SGD creates the buffers itself: buf = d on its first step. (Mask mode "update" needs
            # them up front, or the unfused step could not restore the conserved entries of the buffers.)
            oracle.optimizer.state.clear()
        x, y = _batch(seed=20 + step)
        result = methods.cure_step(fused, x, y)
        loss, stats, revised = _unfused_cure_step(oracle, x, y)
        assert oracle.optimizer.param_groups[0]["lr"] == lr
        assert torch.equal(result.loss, loss)
        assert not bool(result.skipped)
        got = result.mask_stats
        assert torch.equal(got.thresholds.view(torch.int32), stats.thresholds.view(torch.int32))
        assert torch.equal(got.kept, stats.kept) and torch.equal(got.nonfinite, stats.nonfinite)
        assert 0 < int(got.kept.sum()) < fused._param_numel
        for a, b in zip(fused.masker.params, oracle.masker.params):
            assert torch.equal(a.grad, b.grad)  # the masked update gradient
        assert result.revised == revised and fused.cure_step == oracle.cure_step == step + 1
        revised_steps += revised
        _assert_close_tensors(list(fused.module.parameters()), list(oracle.module.parameters()), "param")
        moms = [[c.optimizer.state[q]["momentum_buffer"] for q in c.module.parameters()] for c in (fused, oracle)]
        _assert_close_tensors(*moms, "momentum")
        for a, b in zip(fused.module.buffers(), oracle.module.buffers()):
            assert torch.equal(a, b)  # BatchNorm statistics come from identical forward passes
        if revision:
            assert fused.revision.updates == oracle.revision.updates
            rev = [list(c.revision.module.state_dict().values()) for c in (fused, oracle)]
            _assert_close_tensors(*rev, "revision")
    if revision:
        assert 0 < revised_steps < 4  # both branches of the draw were taken (seeded)


@pytest.mark.parametrize("mask_mode", ["grad", "update"])
def test_fused_first_step_equals_torch_sgd_from_scratch(mask_mode):
    """Zero momentum buffers make the op's first step the one torch.optim.SGD takes without buffers:
    with the same masked gradient, buf = 0.9 * 0 + d = d, bit for bit against the op's own arithmetic."""
    cfg = _config(mask_mode=mask_mode, no_revision=True, weight_decay=5e-2)
    ctx = _context(cfg)
    before = [q.detach().clone() for q in ctx.module.parameters()]
    result = methods.cure_step(ctx, *_batch())
    conserved = _conserved(ctx, result.mask_stats)
    lr, wd = torch.tensor(cfg.lr), torch.tensor(cfg.weight_decay)
    for q, w0, z in zip(ctx.masker.params, before, conserved):
        d = q.grad + wd * w0  # the masked gradient plus weight decay
        buf = ctx.optimizer.state[q]["momentum_buffer"]
        exp_buf, exp_w = d, w0 - lr * d
        if mask_mode == "update":
            exp_buf, exp_w = torch.where(z, torch.zeros_like(d), d), torch.where(z, w0, exp_w)
        assert torch.equal(buf, exp_buf)
        assert torch.equal(q.detach(), exp_w)


def test_skipped_fused_step_still_masks_and_revises_towards_the_unchanged_weights():
    ctx = _context(_config(revision_rate=1.0, mask_mode="update"))
    methods.cure_step(ctx, *_batch(seed=4))
    params = list(ctx.module.parameters())
    before = [q.detach().clone() for q in params]
    bufs = [ctx.optimizer.state[q]["momentum_buffer"].clone() for q in params]
    rev_before = [q.detach().clone() for q in ctx.revision.module.parameters()]
    x, y = _batch()
    x[1, 0, 3, 3] = float("inf")
    result = methods.cure_step(ctx, x, y)
    assert bool(result.skipped) and result.revised
    decay = revision_decay_at(2, ctx.revision.decay)
    for q, w, b, r_old, r in zip(params, before, bufs, rev_before, ctx.revision.module.parameters()):
        assert torch.equal(q.detach(), w) and torch.equal(ctx.optimizer.state[q]["momentum_buffer"], b)
        expected = r_old.clone()
        reference.revise_reference([expected], [w], decay)
        assert torch.equal(r, expected)


def test_lr_scheduler_sees_the_fused_update_as_the_optimizer_step():
    ctx = _context(_config())
    scheduler = torch.optim.lr_scheduler.LambdaLR(ctx.optimizer, lambda step: 0.5**step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would raise
        for _ in range(2):
            methods.cure_step(ctx, *_batch())
            scheduler.step()
    assert ctx.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)


@pytest.mark.parametrize("bn", ["batch", "ema"])
def test_fused_revision_split_equals_the_whole_update(bn):
    """counterparts(params) revised by the fused step plus update_rest equals update(), tensor for tensor;
    a parameter outside params (here a frozen one) is revised by update_rest."""
    torch.manual_seed(0)
    model = build_model("cnn", SPEC)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    whole = RevisionModel(model, rate=1.0, decay=0.999, backend="reference", bn=bn)
    split = RevisionModel(model, rate=1.0, decay=0.999, backend="reference", bn=bn)
    model.train()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(torch.randn_like(q))
        model(torch.rand(8, *SPEC.shape))  # moves the BatchNorm statistics
    params = [q for q in model.parameters() if q.requires_grad]
    rev_params = split.counterparts(params)
    assert len(rev_params) == len(params) == len(list(model.parameters())) - 1
    assert all(r.data_ptr() != q.data_ptr() and r.shape == q.shape for r, q in zip(rev_params, params))
    decay = 0.75
    whole.update(decay)
    reference.revise_reference(rev_params, [q.detach() for q in params], decay)  # what the fused step does
    split.update_rest(decay, params)
    assert split.updates == whole.updates == 1
    for (key, a), b in zip(whole.module.state_dict().items(), split.module.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(ValueError, match="not a parameter"):
        split.counterparts([torch.nn.Parameter(torch.zeros(3))])
