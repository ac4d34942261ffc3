"""PGD (CE / C&W, L-inf / L2) and TRADES' KL attack: constraints, ascent, update rule, side effects."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cure.attacks import margin_loss, pgd, trades_pgd
from cure.data import DatasetSpec
from cure.models import build_model

SPEC = DatasetSpec("toy", 10, (1, 12, 12), (0.3,), (0.3,), 0.1, 0.025, "none")
EPS, STEP = 0.1, 0.025
L2_EPS, L2_STEP = 0.5, 0.125


def _sample(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task: noisy copies of ten fixed templates; the top and bottom three rows are
    black and white, so that pixels sit on both faces of the box [0, 1]."""
    templates = torch.rand(10, *SPEC.shape, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.2 + 0.6 * templates[y] + 0.1 * torch.randn(n, *SPEC.shape, generator=g)).clamp(0, 1)
    x[:, :, :3] = 0.0
    x[:, :, -3:] = 1.0
    return x, y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = build_model("cnn", SPEC)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        x, y = _sample(64, g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval().state_dict()


@pytest.fixture
def model(trained):
    net = build_model("cnn", SPEC)
    net.load_state_dict(trained)
    return net.eval()


@pytest.fixture
def batch():
    return _sample(16, torch.Generator().manual_seed(2))


def _check_constraints(x_adv, x, norm, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        # |fl(x +- eps) - x| <= eps up to one rounding of x + eps (half an ulp of a number <= 1.1).
        assert float(delta.abs().max()) <= eps + 2**-24 * 2
    else:
        assert float(delta.norm(dim=1).max()) <= eps * (1 + 1e-6)
    return delta


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_stays_in_ball_and_box_and_raises_loss(model, batch, norm, loss):
    x, y = batch
    eps, step = (EPS, STEP) if norm == "linf" else (L2_EPS, L2_STEP)
    x_adv = pgd(model, x, y, eps=eps, step_size=step, steps=10, norm=norm, loss=loss)
    _check_constraints(x_adv, x, norm, eps)
    if norm == "linf":  # ten steps of eps/4 push most coordinates to the ball's faces
        interior = (x_adv - x)[:, :, 3:9]
        assert float((interior.abs() > eps * 0.99).float().mean()) > 0.5
    with torch.no_grad():
        z, z_adv = model(x), model(x_adv)
    if loss == "ce":
        clean, adv = F.cross_entropy(z, y, reduction="none"), F.cross_entropy(z_adv, y, reduction="none")
    else:
        clean, adv = margin_loss(z, y), margin_loss(z_adv, y)
    assert float(adv.mean()) > float(clean.mean()) + 0.1
    assert int((adv > clean).sum()) >= 14
    assert (z_adv.argmax(1) == y).sum() <= (z.argmax(1) == y).sum()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trades_pgd_stays_in_ball_and_raises_kl(model, batch, norm):
    x, _ = batch
    eps, step = (EPS, STEP) if norm == "linf" else (L2_EPS, L2_STEP)

    def kl(x_adv):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")

    start = trades_pgd(
        model, x, eps=eps, step_size=step, steps=0, norm=norm, generator=torch.Generator().manual_seed(4)
    )
    x_adv = trades_pgd(
        model, x, eps=eps, step_size=step, steps=10, norm=norm, generator=torch.Generator().manual_seed(4)
    )
    _check_constraints(x_adv, x, norm, eps)
    # The start is x + 0.001 N(0, I) (clipped to [0, 1]).
    assert 0 < float((start - x).abs().max()) < 0.01
    assert float((start - x)[:, :, 3:9].std()) == pytest.approx(0.001, rel=0.1)  # rows away from 0 and 1
    assert float(kl(x_adv)) > 100 * float(kl(start)) and float(kl(x_adv)) > 0.01


def test_linf_update_rule_one_step(model, batch):
    x, y = batch
    x0 = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)
    expected = torch.minimum(torch.maximum(x + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    got = pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, random_start=False)
    assert torch.equal(got, expected)


def test_l2_update_rule_one_step(model, batch):
    x, y = batch
    x0 = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(margin_loss(model(x0), y).sum(), x0)
    g_norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    big_step = 2.0  # beyond eps: the projection must rescale delta to norm eps before clipping to [0, 1]
    delta = big_step * grad / g_norm
    expected = (x + delta * (L2_EPS / delta.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)).clamp(0, 1)
    got = pgd(model, x, y, eps=L2_EPS, step_size=big_step, steps=1, norm="l2", loss="cw", random_start=False)
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def test_trades_linf_update_rule_one_step(model, batch):
    x, _ = batch
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    start = torch.minimum(torch.maximum(x + 0.001 * noise, x - EPS), x + EPS).clamp(0, 1).requires_grad_(True)
    with torch.no_grad():
        p_nat = F.softmax(model(x), 1)
    objective = F.kl_div(F.log_softmax(model(start), 1), p_nat, reduction="batchmean")
    (grad,) = torch.autograd.grad(objective, start)
    expected = torch.minimum(torch.maximum(start + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    got = trades_pgd(model, x, eps=EPS, step_size=STEP, steps=1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(got, expected.detach())


def test_margin_loss_values():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    assert margin_loss(logits, torch.tensor([1, 2])).tolist() == [-1.0, 5.0]


@pytest.mark.parametrize("attack", ["pgd", "trades"])
@pytest.mark.parametrize("training", [True, False])
def test_mode_buffers_and_grads_untouched(model, batch, attack, training):
    x, y = batch
    model.train(training)
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)  # an existing gradient must stay as it is
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    expected_eval = None
    if attack == "pgd":
        run = lambda: pgd(
            model, x, y, eps=EPS, step_size=STEP, steps=3, generator=torch.Generator().manual_seed(0)
        )
    else:
        run = lambda: trades_pgd(
            model, x, eps=EPS, step_size=STEP, steps=3, generator=torch.Generator().manual_seed(0)
        )
    x_adv = run()
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5))
    assert all(p.grad is None for p in params[1:])
    for k, v in model.named_buffers():  # eval mode inside: BN running statistics not updated
        assert torch.equal(v, buffers[k]), k
    model.eval()
    expected_eval = run()
    assert torch.equal(x_adv, expected_eval)  # the attack ran the model in eval mode


def test_generator_determinism(model, batch):
    x, y = batch
    a = pgd(model, x, y, eps=EPS, step_size=STEP, steps=2, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, eps=EPS, step_size=STEP, steps=2, generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, eps=EPS, step_size=STEP, steps=2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(5)
    first = trades_pgd(model, x, eps=EPS, step_size=STEP, steps=1, generator=g)
    second = trades_pgd(model, x, eps=EPS, step_size=STEP, steps=1, generator=g)
    assert not torch.equal(first, second)  # the generator advanced


def test_random_start_is_uniform_in_the_ball(model):
    x = torch.full((64, *SPEC.shape), 0.5)
    y = torch.zeros(64, dtype=torch.int64)
    start = pgd(model, x, y, eps=EPS, step_size=STEP, steps=0, generator=torch.Generator().manual_seed(0))
    delta = start - x
    assert (
        float(delta.abs().max()) <= EPS and float(delta.min()) < -0.9 * EPS and float(delta.max()) > 0.9 * EPS
    )
    assert float(delta.mean()) == pytest.approx(0.0, abs=0.003)
    assert float(delta.std()) == pytest.approx(EPS / 3**0.5, rel=0.02)  # U(-eps, eps)
    l2 = pgd(
        model, x, y, eps=L2_EPS, step_size=1, steps=0, norm="l2", generator=torch.Generator().manual_seed(0)
    )
    radii = (l2 - x).flatten(1).norm(dim=1)
    assert float(radii.max()) <= L2_EPS * (1 + 1e-6) and float(radii.std()) > 0.05


def test_no_attack_cases(model, batch):
    x, y = batch
    assert torch.equal(pgd(model, x, y, eps=EPS, step_size=STEP, steps=0, random_start=False), x)
    assert torch.equal(pgd(model, x, y, eps=0.0, step_size=STEP, steps=3), x)
    assert torch.equal(trades_pgd(model, x, eps=0.0, step_size=STEP, steps=3), x)


def test_channels_last_and_autocast(model, batch):
    x, y = batch
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(model, x_cl, y, eps=EPS, step_size=STEP, steps=8)
        x_trades = trades_pgd(model, x_cl, eps=EPS, step_size=STEP, steps=8)
    for out in (x_adv, x_trades):
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
        _check_constraints(out, x, "linf", EPS)
        assert float((out - x).abs().max()) > 0.9 * EPS


def test_argument_errors(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, norm="l1")
    with pytest.raises(ValueError, match="loss"):
        pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, loss="dlr")
    with pytest.raises(ValueError, match="steps"):
        trades_pgd(model, x, eps=EPS, step_size=STEP, steps=-1)
    with pytest.raises(ValueError, match="eps"):
        trades_pgd(model, x, eps=-0.1, step_size=STEP, steps=1)
    with pytest.raises(ValueError, match="one label per input"):
        pgd(model, x, y[:3], eps=EPS, step_size=STEP, steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_gpu(model, batch):
    x, y = (t.cuda() for t in batch)
    model = model.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, generator=g)  # warm-up (lazy initialisation)
    trades_pgd(model, x, eps=EPS, step_size=STEP, steps=1, generator=g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for norm in ("linf", "l2"):
            pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, norm=norm, loss="cw", generator=g)
            trades_pgd(model, x, eps=EPS, step_size=STEP, steps=3, norm=norm, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_margin_loss_clamped_at_kappa():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0], [0.0, 70.0, 1.0]])
    y = torch.tensor([1, 2, 2])
    assert margin_loss(logits, y).tolist() == [-1.0, 5.0, 69.0]
    assert margin_loss(logits, y, kappa=50.0).tolist() == [-1.0, 5.0, 50.0]
    # The official loss -max(z_y - max_{j != y} z_j + kappa, 0) is the clamped margin minus kappa.
    z_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    official = -torch.clamp(logits.gather(1, y[:, None]).squeeze(1) - z_other + 50.0, min=0.0)
    assert torch.equal(margin_loss(logits, y, kappa=50.0) - 50.0, official)


def test_kappa_stops_the_ascent_of_samples_beyond_the_confidence(model, batch):
    x, y = batch
    # Inputs misclassified by various margins (a strong attack's output); kappa splits them in two.
    x = pgd(model, x, y, eps=0.3, step_size=0.05, steps=10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        margin = margin_loss(model(x), y)
    kappa = float(margin.median())
    beyond = margin > kappa  # no gradient through min(margin, kappa)
    assert kappa > 0 and beyond.any() and (~beyond).any()
    x0 = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(margin_loss(model(x0), y, kappa=kappa).sum(), x0)
    expected = torch.minimum(torch.maximum(x + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    got = pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, loss="cw", kappa=kappa, random_start=False)
    assert torch.equal(got, expected)
    assert torch.equal(got[beyond], x[beyond]) and not torch.equal(got[~beyond], x[~beyond])


@pytest.mark.parametrize("clip_start", [True, False])
def test_random_start_clipping_before_the_first_gradient(model, batch, clip_start):
    x, y = batch
    assert float(x.min()) == 0.0  # pixels at the box's edge: the raw start leaves [0, 1]
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    start = x + (2.0 * u - 1.0) * EPS
    if clip_start:
        start = torch.minimum(torch.maximum(start, x - EPS), x + EPS).clamp(0, 1)
    assert (float(start.min()) < 0.0) == (not clip_start)
    start.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    expected = torch.minimum(torch.maximum(start + STEP * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    got = pgd(
        model, x, y, eps=EPS, step_size=STEP, steps=1, generator=torch.Generator().manual_seed(4),
        clip_start=clip_start,
    )  # fmt: skip
    assert torch.equal(got, expected.detach())
    _check_constraints(got, x, "linf", EPS)
    # No steps: the start itself is returned, projected either way (the result always lies in [0, 1]).
    only_start = pgd(model, x, y, eps=EPS, step_size=STEP, steps=0, clip_start=False)
    _check_constraints(only_start, x, "linf", EPS)


def test_kappa_argument_errors(model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="kappa .* needs loss='cw'"):
        pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, loss="ce", kappa=50.0)
    with pytest.raises(ValueError, match="kappa must be a number >= 0"):
        pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, loss="cw", kappa=-1.0)
