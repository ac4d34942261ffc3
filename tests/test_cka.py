"""Linear CKA: its mathematical properties, the block lists, and `cure analyze cka` end to end."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from tiny_runs import fashion_images, write_checkpoint

from cure.cka import BLOCKS, CKAError, block_modules, extract_features, gram, linear_cka
from cure.cli import main
from cure.data import DATASETS
from cure.models import ARCHS, build_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _features(n: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64)


def _orthogonal(p: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_features(p, p, seed))
    return q


def _reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), feature-space form: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("n, p", [(40, 7), (12, 300)])  # fewer features than samples, and far more
def test_cka_of_features_with_themselves_is_one(n, p, unbiased):
    x = _features(n, p, 1)
    assert linear_cka(x, x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ _orthogonal(p, 2) * 5.0 + 3.0, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariant_to_orthogonal_transforms_and_isotropic_scaling(unbiased):
    x, y = _features(50, 9, 3), _features(50, 6, 4)
    y = y + 0.8 * x[:, :6]  # correlated, so the value is far from 0 and from 1
    base = linear_cka(x, y, unbiased=unbiased)
    assert 0.1 < base < 0.95
    assert linear_cka(x @ _orthogonal(9, 5), y, unbiased=unbiased) == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, y @ _orthogonal(6, 6), unbiased=unbiased) == pytest.approx(base, abs=1e-12)
    for scale in (1e-6, 0.37, 1e6):
        assert linear_cka(scale * x, y, unbiased=unbiased) == pytest.approx(base, abs=1e-12)
    # ... but not to scaling single features differently (the property is not trivially true)
    stretched = x.clone()
    stretched[:, 0] *= 10.0
    assert abs(linear_cka(stretched, y, unbiased=unbiased) - base) > 1e-3


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_is_symmetric(unbiased):
    x, y = _features(30, 5, 7), _features(30, 11, 8)
    y[:, :5] += x
    assert linear_cka(x, y, unbiased=unbiased) == pytest.approx(linear_cka(y, x, unbiased=unbiased), abs=1e-14)


def test_standard_cka_matches_the_feature_space_formula():
    x, y = _features(25, 4, 9), _features(25, 8, 10)
    y[:, :4] += 0.5 * x
    assert linear_cka(x, y) == pytest.approx(_reference_cka(x.numpy(), y.numpy()), rel=1e-12)
    # float32 features are computed in float64: the same value to double precision
    assert linear_cka(x.float(), y.float()) == pytest.approx(_reference_cka(x.float().double().numpy(),
                                                                            y.float().double().numpy()), rel=1e-10)


def test_cka_of_independent_features_is_small_and_the_unbiased_estimate_near_zero():
    x, y = _features(400, 10, 11), _features(400, 10, 12)
    assert 0 <= linear_cka(x, y) < 0.1
    assert abs(linear_cka(x, y, unbiased=True)) < 0.02


def test_cka_is_nan_for_a_constant_representation_and_errors_name_the_problem():
    x = _features(10, 3, 13)
    assert math.isnan(linear_cka(x, torch.ones(10, 4)))
    with pytest.raises(CKAError, match="same samples"):
        linear_cka(x, _features(9, 3, 14))
    with pytest.raises(CKAError, match="at least 4 samples"):
        linear_cka(x[:3], x[:3], unbiased=True)
    with pytest.raises(CKAError, match="non-finite"):
        linear_cka(torch.tensor([[1.0], [math.nan]]), torch.ones(2, 1))


def test_gram_is_centred_and_float64():
    k = gram(_features(6, 3, 15).float() + 10.0)
    assert k.dtype == torch.float64 and k.shape == (6, 6)
    assert torch.allclose(k.sum(dim=0), torch.zeros(6, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_has_a_block_list_that_resolves(arch):
    assert arch in BLOCKS
    with torch.device("meta"):
        model = build_model(arch, DATASETS["cifar10"])
    names = [name for name, _ in block_modules(model, arch)]
    assert names == [name for name, _ in BLOCKS[arch]]
    assert names[-1] in ("fc", "logits")


def test_block_features_are_copies_taken_before_in_place_relus():
    torch.manual_seed(0)
    model = build_model("cnn", DATASETS["fashion-mnist"]).eval()
    x, _ = fashion_images(6, seed=1)
    x = x.float() / 255.0
    feats = extract_features(model, "cnn", x, batch_size=4)
    assert [f.shape for f in feats.values()] == [(6, 32 * 14 * 14), (6, 64 * 7 * 7), (6, 128), (6, 10)]
    with torch.no_grad():
        stage1 = model.features[:4](model.normalize(x)).flatten(1)
        hidden = model.classifier[:2](model.features(model.normalize(x)).flatten(1))
        logits = model(x)
    torch.testing.assert_close(feats["stage1"], stage1)
    torch.testing.assert_close(feats["fc1"], hidden)
    torch.testing.assert_close(feats["logits"], logits)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_analyze_cka_command_end_to_end(tmp_path, capsys):
    a = write_checkpoint(tmp_path / "a" / "last.pt", seed=0, revision=True)
    b = write_checkpoint(tmp_path / "b" / "last.pt", seed=1, steps=6)
    out = tmp_path / "cka"
    argv = ["analyze", "cka", "--a", str(a), "--b", str(b), "--out", str(out), "--samples", "40"]
    assert main(argv + ["--adversarial", "--device", "cpu"]) == 0
    rows = _read_csv(out / "cka.csv")
    assert [r["layer"] for r in rows] == [name for name, _ in BLOCKS["cnn"]]
    for r in rows:
        for key in ("cka", "cka_adversarial"):
            assert 0.0 <= float(r[key]) <= 1.0 + 1e-9
    assert any(float(r["cka"]) < 0.999 for r in rows)  # two different models
    matrix = _read_csv(out / "cka_matrix.csv")
    assert len(matrix) == 2 * len(BLOCKS["cnn"]) ** 2
    png = (out / "cka.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    printed = capsys.readouterr().out
    assert "stage1" in printed and "cka.csv" in printed

    # a model against itself (its revision copy holds the same weights): CKA 1 at every block
    same = tmp_path / "same"
    assert main(["analyze", "cka", "--a", str(a), "--b", str(a), "--b-which", "revision", "--out", str(same),
                 "--samples", "16", "--estimator", "unbiased", "--device", "cpu"]) == 0  # fmt: skip
    for r in _read_csv(same / "cka.csv"):
        assert float(r["cka"]) == pytest.approx(1.0, abs=1e-9)


def test_analyze_cka_reports_bad_arguments(tmp_path, capsys):
    a = write_checkpoint(tmp_path / "a.pt", seed=0, steps=1)
    with pytest.raises(SystemExit) as info:
        main(["analyze", "cka", "--a", str(a), "--b", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["analyze", "cka", "--a", str(a), "--b", str(a), "--out", str(tmp_path / "o"), "--samples", "1"])
    assert info.value.code == 2
    assert "--samples must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["analyze", "cka", "--a", str(a), "--b", str(a), "--b-which", "revision", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "holds no revision model" in capsys.readouterr().err
