"""The 15 common corruptions: shape, range, dtype, determinism, severity trend, definitions; the evaluation."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import torch
from tiny_runs import fashion_images, write_checkpoint
from torch import nn

from cure.cli import main
from cure.corruptions import CORRUPTIONS, PARAMETERS, SEVERITIES, corrupt, frost_texture, plasma_fractal
from cure.evaluation import evaluate_corruptions

#: Corruptions without randomness: the seed cannot change them.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
#: Corruptions whose mean |x' - x| grows strictly with the severity on natural images. The others follow
#: their published parameters, which are not ordered that way: glass blur (severity 4 has a smaller sigma
#: than 3), motion blur (severities 3 and 4 share sigma 2, so their kernels nearly coincide), frost (the
#: image's weight drops while the frost's grows, which partly cancels), elastic transform (the affine
#: jitter shrinks as the elastic field grows) and pixelate on already smooth images.
MONOTONE = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "zoom_blur",
    "snow",
    "fog",
    "brightness",
    "contrast",
    "jpeg_compression",
)


def _gray(n: int = 6) -> torch.Tensor:
    return fashion_images(n, seed=3, train=False)[0]  # uint8 (n, 1, 28, 28)


def _rgb(n: int = 6) -> torch.Tensor:
    """Smooth random colour images (n, 3, 32, 32) in [0, 1]: 8x8 colour noise, bilinearly enlarged."""
    g = torch.Generator().manual_seed(5)
    base = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


@pytest.fixture(scope="module", params=["gray", "rgb"])
def images(request):
    return _gray() if request.param == "gray" else _rgb()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_range_dtype_and_determinism(images, name):
    for severity in (1, 5):
        out = corrupt(images, name, severity, seed=7)
        assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, corrupt(images, name, severity, seed=7))  # same seed: same images
        # per-image seeding: a slice corrupted alone equals the same images corrupted in the batch
        assert torch.equal(out[2:5], corrupt(images[2:5], name, severity, seed=7, start_index=2))
        assert not torch.equal(out, _unit(images))  # it does change the images
        other = corrupt(images, name, severity, seed=8)
        if name in DETERMINISTIC:
            assert torch.equal(out, other)
        else:
            assert not torch.equal(out, other)


def test_uint8_and_float_inputs_agree():
    x = _gray(3)
    for name in ("fog", "jpeg_compression", "snow"):  # float32 x / 255 differs from k / 255 in the last bits
        torch.testing.assert_close(corrupt(x, name, 3, seed=1), corrupt(x.float() / 255.0, name, 3, seed=1))


def _distortion(x: torch.Tensor, name: str) -> list[float]:
    return [(corrupt(x, name, s, seed=0) - _unit(x)).abs().mean().item() for s in SEVERITIES]


@pytest.mark.parametrize("kind", ["gray", "rgb"])
def test_distortion_grows_with_severity(kind):
    x = _gray(16) if kind == "gray" else _rgb(16)
    for name in CORRUPTIONS:
        d = _distortion(x, name)
        if name in MONOTONE:
            assert all(a < b for a, b in zip(d, d[1:])), (name, d)
        elif name != "elastic_transform":  # see MONOTONE: its affine part shrinks with the severity
            assert d[-1] > d[0], (name, d)


# ------------------------------------------------------------------------------------------------
# The published definitions on inputs with known answers
def test_contrast_and_brightness_follow_their_definitions():
    x = _rgb(4).double()
    for s in SEVERITIES:
        c = PARAMETERS["contrast"][s - 1]
        mean = x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(corrupt(x.float(), "contrast", s).double(), ((x - mean) * c + mean).clamp(0, 1),
                                   atol=1e-6, rtol=0)  # fmt: skip
    g = _unit(_gray(2))
    torch.testing.assert_close(corrupt(g, "brightness", 2), (g + 0.1).clamp(0, 1), atol=1e-6, rtol=0)
    # RGB: +c on the HSV value, hue and saturation kept
    x = _rgb(1)
    out = corrupt(x, "brightness", 5)
    for i, j in ((0, 0), (5, 17), (31, 9)):
        h0, s0, v0 = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
        h1, s1, v1 = colorsys.rgb_to_hsv(*out[0, :, i, j].tolist())
        assert (h1, s1, v1) == pytest.approx((h0, s0, min(v0 + 0.3, 1.0)), abs=1e-5)


def test_noise_levels_match_their_parameters():
    grey = torch.full((4, 3, 32, 32), 0.5)
    for s in (1, 5):
        c = PARAMETERS["gaussian_noise"][s - 1]
        assert (corrupt(grey, "gaussian_noise", s) - 0.5).std().item() == pytest.approx(c, rel=0.05)
        changed = (corrupt(grey, "impulse_noise", s) != 0.5).float().mean().item()
        assert changed == pytest.approx(PARAMETERS["impulse_noise"][s - 1], rel=0.15)
        shot = corrupt(grey, "shot_noise", s)
        lam = PARAMETERS["shot_noise"][s - 1]
        assert shot.mean().item() == pytest.approx(0.5, abs=0.01)
        assert shot.std().item() == pytest.approx((0.5 / lam) ** 0.5, rel=0.05)  # Poisson: var = x / c


def test_blurs_and_pixelate_keep_a_constant_image_and_jpeg_quantises():
    flat = torch.full((2, 3, 32, 32), 0.4)
    for name in ("defocus_blur", "zoom_blur", "pixelate", "motion_blur", "glass_blur"):
        out = corrupt(flat, name, 5)
        tol = 1.5 / 255 if name == "glass_blur" else 1e-6  # glass blur quantises to 8 bits on the way
        assert (out - 0.4).abs().max().item() <= tol, name
    out = corrupt(_rgb(2), "jpeg_compression", 3)
    assert torch.equal(out * 255, torch.round(out * 255))
    # fog on a constant image: (x + a f) x / (x + a) with f in [0, 1], so it never exceeds x
    fogged = corrupt(flat, "fog", 3)
    assert fogged.max().item() <= 0.4 + 1e-6 and fogged.std().item() > 0.01


def test_glass_blur_is_the_published_sequential_scan():
    """The released generator's scan: for h, w from size - 1 down to 2, pixel (h, w) takes the value at
    (h + dy, w + dx), dx, dy in {-1, 0} (its view-based 'swap' copies); blur, quantise before, blur after."""
    from cure.corruptions import _gauss_hw, _glass_blur

    x = np.random.default_rng(0).random((2, 3, 16, 16))
    for c in PARAMETERS["glass_blur"]:
        sigma, d, iterations = c
        out = np.floor(np.clip(_gauss_hw(x, sigma), 0, 1) * 255.0) / 255.0
        rows, cols = range(16 - d, d, -1), range(16 - d, d, -1)
        shape = (iterations, len(rows), len(cols), 2)
        shifts = np.stack([np.random.default_rng(i).integers(-d, d, shape) for i in range(2)])
        for i in range(2):
            for it in range(iterations):
                for a, h in enumerate(rows):
                    for b, w in enumerate(cols):
                        dx, dy = shifts[i, it, a, b]
                        out[i, :, h, w] = out[i, :, h + dy, w + dx]
        expected = _gauss_hw(out, sigma)
        got = _glass_blur(x, c, [np.random.default_rng(i) for i in range(2)])
        np.testing.assert_array_equal(got, expected)


def test_plasma_fractal_and_frost_texture():
    rng = np.random.default_rng(0)
    m = plasma_fractal(32, 2.0, rng)
    assert m.shape == (32, 32) and m.min() == 0.0 and m.max() == 1.0
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(28, 2.0, rng)
    t = frost_texture(28, 28, np.random.default_rng(1))
    assert t.shape == (28, 28) and 0 <= t.min() and t.max() <= 1 and 0.15 < t.mean() < 0.75


def test_bad_arguments_are_reported():
    x = _rgb(2)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(x, "rain", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity must be one of"):
            corrupt(x, "fog", severity)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        corrupt(torch.rand(2, 2, 32, 32), "fog", 1)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        corrupt(x * 2, "fog", 1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        corrupt(x, "fog", 1, seed=-1)


# ------------------------------------------------------------------------------------------------
class _ConstantClass(nn.Module):
    """Predicts class ``k`` for every input."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(k), 10).float())

    def forward(self, x):
        return self.bias.expand(x.shape[0], 10)


def test_evaluate_corruptions_known_answer_and_batch_independence():
    x, y = fashion_images(10, seed=4, train=False)
    k = int(y[0])
    res = evaluate_corruptions(_ConstantClass(k), x, y, severities=(2,), batch_size=4, device="cpu", progress=False)
    expected = 100.0 * (y == k).float().mean().item()
    assert set(res["corruptions"]) == set(CORRUPTIONS)
    assert all(v == pytest.approx(expected) for v in res["corruptions"].values())
    assert res["corruption_acc"] == pytest.approx(expected)

    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    kw = dict(severities=(1, 5), corruptions=("fog", "glass_blur"), device="cpu", progress=False, seed=3)
    a = evaluate_corruptions(linear, x, y, batch_size=3, **kw)
    b = evaluate_corruptions(linear, x, y, batch_size=10, **kw)
    assert a == b
    assert set(a["corruptions_by_severity"]["fog"]) == {"1", "5"}
    assert a["corruptions"]["fog"] == pytest.approx(sum(a["corruptions_by_severity"]["fog"].values()) / 2)
    with pytest.raises(ValueError, match="severities must be distinct values"):
        evaluate_corruptions(linear, x, y, severities=(0,), device="cpu")


def test_eval_command_with_corruptions(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "run" / "last.pt", seed=0, method="cure", revision=True)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"method": "cure", "last_nat_acc": 50.0}))
    argv = ["eval", "--checkpoint", str(ckpt), "--eval-samples", "8", "--device", "cpu", "--no-progress"]
    assert main(argv + ["--attacks", "nat,corruptions", "--severities", "1,5", "--which", "both"]) == 0
    printed = capsys.readouterr().out
    assert "jpeg_compression" in printed and "mean (corruption_acc)" in printed and "Nat" in printed
    entry = json.loads((tmp_path / "run" / "eval.json").read_text())["last.pt"]
    assert entry["attacks"] == ["nat", "corruptions"] and entry["corruption_severities"] == [1, 5]
    for which in ("model", "revision"):
        row = entry[which]
        assert "nat_acc" in row and set(row["corruptions"]) == set(CORRUPTIONS)
        assert row["corruption_acc"] == pytest.approx(sum(row["corruptions"].values()) / 15)
        assert all(0 <= v <= 100 for v in row["corruptions"].values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_nat_acc"] == 50.0  # kept
    assert summary["corruption_acc"] == entry["model"]["corruption_acc"]
    assert summary["rev_corruptions"] == entry["revision"]["corruptions"]
    assert summary["corruption_severities"] == [1, 5]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attacks", "corruptions", "--severities", "0,2"], "--severities must be distinct values from 1..5"),
        (["--attacks", "nat", "--severities", "2"], "--severities applies only with 'corruptions'"),
        (["--attacks", "nat,rain"], "unknown attack 'rain'"),
    ],
)
def test_eval_command_rejects_bad_corruption_arguments(tmp_path, capsys, extra, message):
    ckpt = write_checkpoint(tmp_path / "last.pt", seed=0, steps=1)
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(ckpt), "--device", "cpu", *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
