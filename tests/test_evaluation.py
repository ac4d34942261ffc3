"""NRR arithmetic and evaluate(): natural accuracy, PGD-20/100, C&W, AutoAttack on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cure.attacks import pgd
from cure.data import DatasetSpec
from cure.evaluation import (
    ATTACKS,
    CW_STEPS,
    OFFICIAL_CW_KAPPA,
    OFFICIAL_CW_STEPS,
    OFFICIAL_STEP_SIZE,
    PGD_STEPS,
    attack_settings,
    evaluate,
    nrr,
)
from cure.models import build_model

SPEC = DatasetSpec("toy", 10, (1, 12, 12), (0.4,), (0.3,), 0.1, 0.025, "none")


def test_nrr_arithmetic():
    assert nrr(0.0, 0.0) == 0.0
    assert nrr(50.0, 50.0) == 50.0
    assert nrr(100.0, 0.0) == 0.0
    assert nrr(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)
    assert nrr(30.0, 70.0) == nrr(70.0, 30.0)
    # The paper's figures (Table 1 and 3): TRADES ResNet-18 C&W, WRN-34-10 CURE C&W, ResNet-18 CURE AA.
    assert nrr(82.41, 50.43) == pytest.approx(62.57, abs=0.005)
    assert nrr(87.05, 55.25) == pytest.approx(67.60, abs=0.005)
    assert nrr(86.76, 49.69) == pytest.approx(63.18, abs=0.01)


def _sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of ten fixed templates, as uint8 images."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, *SPEC.shape, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 10, (n,), generator=g)
    x = (0.2 + 0.6 * templates[y] + 0.15 * torch.randn(n, *SPEC.shape, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = build_model("cnn", SPEC)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(30):
        x, y = _sample(64, seed=1000 + step)
        opt.zero_grad()
        F.cross_entropy(net(x.float() / 255), y).backward()
        opt.step()
    return net.state_dict()


@pytest.fixture
def model(trained):
    net = build_model("cnn", SPEC)
    net.load_state_dict(trained)
    return net.eval()


def test_natural_accuracy_matches_a_direct_count(model):
    images, labels = _sample(70, seed=5)
    res = evaluate(
        model, images, labels, spec=SPEC, attacks=("nat",), batch_size=32, device="cpu", progress=False
    )
    with torch.no_grad():
        direct = (model(images.float() / 255).argmax(1) == labels).float().mean().item() * 100
    assert list(res) == ["nat"] and res["nat"] == pytest.approx(direct)
    assert res["nat"] > 70  # the toy task is learnt, so the attacks below have something to break
    floats = evaluate(
        model, images.float() / 255, labels, spec=SPEC, attacks=("nat",), device="cpu", progress=False
    )
    assert floats["nat"] == res["nat"]


def test_pgd_and_cw(model):
    images, labels = _sample(32, seed=6)
    kw = dict(spec=SPEC, batch_size=20, device="cpu", progress=False, eps=0.06)
    res = evaluate(model, images, labels, attacks=("nat", "pgd20", "pgd100", "cw"), **kw)
    assert list(res) == ["nat", "pgd20", "pgd100", "cw"]
    assert all(0.0 <= v <= 100.0 for v in res.values())
    assert res["pgd20"] < res["nat"] - 10 and res["cw"] < res["nat"] - 10
    assert res["pgd100"] <= res["pgd20"] + 100 / 32  # more steps: no weaker (one sample of slack)
    # Reproducible for a seed (the random starts come from a generator seeded with it).
    assert evaluate(model, images, labels, attacks=("pgd20", "nat"), **kw) == {
        "pgd20": res["pgd20"],
        "nat": res["nat"],
    }
    # The definitions: PGD-20 on CE and PGD-30 on the C&W margin, step eps/4, random start from a
    # generator seeded with `seed` (one batch here, so the draws line up).
    x = images.float() / 255
    for name, steps, loss in (("pgd20", 20, "ce"), ("cw", 30, "cw")):
        x_adv = pgd(
            model,
            x,
            labels,
            eps=0.06,
            step_size=0.015,
            steps=steps,
            loss=loss,
            generator=torch.Generator().manual_seed(3),
        )
        with torch.no_grad():
            direct = 100.0 * (model(x_adv).argmax(1) == labels).float().mean().item()
        got = evaluate(model, images, labels, attacks=(name,), **dict(kw, batch_size=64, seed=3))
        assert got[name] == pytest.approx(direct)
    # A larger radius is a stronger attack; radius 0 is no attack.
    strong = evaluate(model, images, labels, attacks=("pgd20",), **dict(kw, eps=0.2))
    assert strong["pgd20"] <= res["pgd20"] and strong["pgd20"] < 10
    zero = evaluate(model, images, labels, attacks=("nat", "pgd20", "cw"), **dict(kw, eps=0.0))
    assert zero["pgd20"] == zero["cw"] == zero["nat"] == res["nat"]


def test_eval_mode_restored_and_rng_untouched(model):
    images, labels = _sample(20, seed=7)
    model.train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    state = torch.random.get_rng_state()
    res = evaluate(model, images, labels, spec=SPEC, attacks=("nat", "cw"), device="cpu", progress=False)
    assert model.training  # mode restored
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # BN ran in eval mode
    assert torch.equal(torch.random.get_rng_state(), state)  # own generator for the random starts
    model.eval()
    assert (
        evaluate(model, images, labels, spec=SPEC, attacks=("nat", "cw"), device="cpu", progress=False) == res
    )


def test_channels_last_model(model):
    images, labels = _sample(30, seed=8)
    ref = evaluate(model, images, labels, spec=SPEC, attacks=("nat",), device="cpu", progress=False)
    model = model.to(memory_format=torch.channels_last)
    assert evaluate(model, images, labels, spec=SPEC, attacks=("nat",), device="cpu", progress=False) == ref


def _check_autoattack(model, n: int, eps: float, seed: int, compare_direct: bool) -> dict[str, float]:
    pyautoattack = pytest.importorskip("pyautoattack")
    images, labels = _sample(n, seed=seed)
    state = torch.random.get_rng_state()
    res = evaluate(
        model,
        images,
        labels,
        spec=SPEC,
        attacks=("nat", "pgd20", "aa"),
        eps=eps,
        device="cpu",
        progress=False,
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # AutoAttack's global seeding is undone
    assert list(res) == ["nat", "pgd20", "aa"]
    assert res["aa"] <= res["nat"]
    if not compare_direct:
        return res
    # The same number as running AutoAttack 'standard' directly.
    adversary = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
    x = images.float() / 255
    x_adv, y_adv = adversary.run_standard_evaluation(x, labels, batch_size=256)
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert res["aa"] == pytest.approx(100.0 * (y_adv == labels).float().mean().item())
    with torch.no_grad():
        assert res["aa"] == pytest.approx(100.0 * (model(x_adv).argmax(1) == labels).float().mean().item())
    return res


def test_autoattack_is_the_original_code(model):
    # A radius at which APGD-CE flips every sample, so AutoAttack stops early (a few seconds).
    res = _check_autoattack(model, n=10, eps=0.1, seed=9, compare_direct=True)
    assert res["nat"] > 50 and res["aa"] == 0.0


@pytest.mark.slow
def test_autoattack_with_robust_samples_left(model):
    # A small radius: some samples survive all four attacks (Square's 5000 queries make this slow).
    res = _check_autoattack(model, n=8, eps=0.07, seed=9, compare_direct=False)
    assert 0 < res["aa"] < 100


def test_argument_errors(model):
    images, labels = _sample(4, seed=10)
    kw = dict(spec=SPEC, device="cpu", progress=False)
    assert ATTACKS == ("nat", "pgd20", "pgd100", "cw", "aa")
    assert PGD_STEPS == {"pgd20": 20, "pgd100": 100} and CW_STEPS == 30
    with pytest.raises(ValueError, match="nat, pgd20, pgd100, cw, aa"):
        evaluate(model, images, labels, attacks=("fgsm",), **kw)
    with pytest.raises(ValueError, match="twice"):
        evaluate(model, images, labels, attacks=("nat", "nat"), **kw)
    with pytest.raises(ValueError, match="at least one image"):
        evaluate(model, images[:0], labels[:0], attacks=("nat",), **kw)
    with pytest.raises(ValueError, match="expects"):
        evaluate(model, torch.zeros(4, 3, 12, 12, dtype=torch.uint8), labels, attacks=("nat",), **kw)
    with pytest.raises(ValueError, match="one label each"):
        evaluate(model, images, labels[:3], attacks=("nat",), **kw)
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, images, labels, attacks=("nat",), eps=2.0, **kw)


def _official_loop(model, x, y, *, eps, steps, step_size, noise, loss):
    """The official evaluation's attack loop (utilities/adv_utils.py: _pgd_whitebox and cnw), written out:
    x + uniform noise in [-eps, eps] (not clipped), then per step: ascent on the batch-mean CE (or the
    summed C&W loss -max(z_y - max_{j != y} z_j + 50, 0)) by step_size * sign(grad), delta clamped to
    [-eps, eps], the point clamped to [0, 1]."""
    x_pgd = x + noise
    for _ in range(steps):
        x_pgd = x_pgd.detach().requires_grad_(True)
        out = model(x_pgd)
        if loss == "ce":
            objective = F.cross_entropy(out, y)
        else:
            real = out.gather(1, y[:, None]).squeeze(1)
            other = out.scatter(1, y[:, None], float("-inf")).amax(1)
            objective = -torch.clamp(real - other + 50.0, min=0.0).sum()
        (grad,) = torch.autograd.grad(objective, x_pgd)
        x_pgd = x_pgd.detach() + step_size * grad.sign()
        x_pgd = torch.clamp(x + torch.clamp(x_pgd - x, -eps, eps), 0.0, 1.0)
    return x_pgd


@pytest.mark.parametrize("eps", [8 / 255, 0.1])
def test_official_protocol_reproduces_the_official_attacks(model, eps):
    images, labels = _sample(32, seed=11)
    x = images.float() / 255
    kw = dict(spec=SPEC, batch_size=64, device="cpu", progress=False, eps=eps, seed=7)
    for name, steps, loss in (("pgd20", 20, "ce"), ("cw", 20, "cw")):
        got = evaluate(model, images, labels, attacks=(name,), protocol="official", **kw)  # one draw of noise
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
        x_adv = _official_loop(
            model, x, labels, eps=eps, steps=steps, step_size=0.003, noise=(2 * u - 1) * eps, loss=loss
        )
        assert float((x_adv - x).abs().max()) <= eps + 1e-6 and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
        with torch.no_grad():
            direct = 100.0 * (model(x_adv).argmax(1) == labels).float().mean().item()
        assert got[name] == pytest.approx(direct), name


def test_attack_settings_of_both_protocols():
    eps = 8 / 255
    ours = attack_settings(("nat", "pgd20", "pgd100", "cw", "aa"), eps)
    assert list(ours) == ["pgd20", "pgd100", "cw"]  # nat and aa have no PGD settings
    assert ours["pgd20"] == {
        "eps": eps, "step_size": eps / 4, "steps": 20, "loss": "ce", "kappa": None, "random_start": True,
        "clip_start": True,
    }  # fmt: skip
    assert ours["cw"]["steps"] == CW_STEPS and ours["cw"]["kappa"] is None and ours["pgd100"]["steps"] == 100
    official = attack_settings(("pgd20", "pgd100", "cw"), eps, "official")
    assert {k: v["step_size"] for k, v in official.items()} == dict.fromkeys(official, OFFICIAL_STEP_SIZE)
    assert OFFICIAL_STEP_SIZE == 0.003 and OFFICIAL_CW_STEPS == 20 and OFFICIAL_CW_KAPPA == 50.0
    assert official["cw"]["kappa"] == 50.0 and official["cw"]["steps"] == 20 and official["pgd100"]["steps"] == 100
    assert not any(v["clip_start"] for v in official.values())
    # On Fashion-MNIST (eps 0.1) the official step stays 0.003, as in the official code.
    assert attack_settings(("pgd20",), 0.1, "official")["pgd20"]["step_size"] == 0.003
    with pytest.raises(ValueError, match="protocol must be one of 'ours', 'official'"):
        attack_settings(("pgd20",), eps, "theirs")
