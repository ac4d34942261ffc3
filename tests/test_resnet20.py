"""ResNet-20 (He et al. 2016): shapes on 1x28x28 and 3x32x32, parameter count, option-A shortcuts,
channels_last, and a checkpoint round trip through cure.load_model."""

from __future__ import annotations

import pytest
import torch

from cure.checkpoint import FORMAT, VERSION, atomic_save, load_model
from cure.config import TrainConfig
from cure.data import DATASETS
from cure.models import ResNet20, ZeroPadBlock, build_model

FMNIST, CIFAR10, CIFAR100 = DATASETS["fashion-mnist"], DATASETS["cifar10"], DATASETS["cifar100"]


@pytest.mark.parametrize("spec", [FMNIST, CIFAR10, CIFAR100], ids=lambda s: s.name)
def test_shapes_and_gradients(spec):
    torch.manual_seed(0)
    model = build_model("resnet20", spec)
    assert isinstance(model, ResNet20)
    x = torch.rand(3, *spec.shape)
    out = model.train()(x)
    assert out.shape == (3, spec.num_classes) and out.dtype == torch.float32
    out.sum().backward()
    assert all(q.grad is not None for q in model.parameters())
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, spec.num_classes)


def test_parameter_count_and_structure():
    model = build_model("resnet20", CIFAR10)
    # stem 3*16*9 + BN 32; stage 1: 3 blocks of 2 * (16*16*9) + 2 BN of 16; stage 2: 16*32*9 + 5 * 32*32*9
    # + 6 BN of 32; stage 3: 32*64*9 + 5 * 64*64*9 + 6 BN of 64; linear 64*10 + 10.
    expected = (432 + 32) + 3 * (2 * 2304 + 64) + (4608 + 5 * 9216 + 6 * 64) + (18432 + 5 * 36864 + 6 * 128) + 650
    assert sum(q.numel() for q in model.parameters()) == expected == 269_722  # the paper's 0.27 M
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 and all(c.kernel_size == (3, 3) for c in convs)  # 19 convs + linear = 20 layers
    assert [c.out_channels for c in convs[1::6]] == [16, 32, 64]
    assert sum(q.numel() for q in build_model("resnet20", FMNIST).parameters()) == 269_722 - 2 * 16 * 9


def test_zero_padding_shortcut_is_subsample_and_pad():
    block = ZeroPadBlock(16, 32, stride=2).eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        for m in (block.conv1, block.conv2):
            m.weight.zero_()
        out = block(x)  # the residual branch is 0 (BN of zeros is its bias, 0): only the shortcut remains
    expected = torch.zeros(2, 32, 5, 5)
    expected[:, 8:24] = x[:, :, ::2, ::2]
    torch.testing.assert_close(out, torch.relu(expected))
    with pytest.raises(ValueError, match="cannot reduce channels"):
        ZeroPadBlock(32, 16, stride=1)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model("resnet20", CIFAR10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_through_load_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet20", CIFAR10).train()
    model(torch.rand(4, 3, 32, 32))  # non-trivial BatchNorm statistics
    cfg = TrainConfig(method="st", arch="resnet20", dataset="cifar10").validate()
    path = tmp_path / "last.pt"
    atomic_save({"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), "model": model.state_dict()}, path)
    loaded = load_model(path)
    assert isinstance(loaded, ResNet20) and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
