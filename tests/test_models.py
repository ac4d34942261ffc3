"""Model zoo: shapes on 1x28x28 and 3x32x32, normalisation inside the model, channels_last, errors."""

from __future__ import annotations

import pytest
import torch

from cure import data
from cure.data import DATASETS, DatasetSpec
from cure.models import ARCHS, Normalize, build_model

FMNIST, CIFAR10, CIFAR100 = DATASETS["fashion-mnist"], DATASETS["cifar10"], DATASETS["cifar100"]


@pytest.mark.parametrize("arch", ["cnn", "resnet18", "preact-resnet18"])
@pytest.mark.parametrize("spec", [FMNIST, CIFAR10, CIFAR100], ids=lambda s: s.name)
def test_output_shapes(arch, spec):
    torch.manual_seed(0)
    model = build_model(arch, spec)
    x = torch.rand(3, *spec.shape)
    model.train()
    out = model(x)
    assert out.shape == (3, spec.num_classes) and out.dtype == torch.float32
    out.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, spec.num_classes)  # batch of one in eval mode


def test_wrn_34_10_forward():
    torch.manual_seed(0)
    model = build_model("wrn-34-10", CIFAR10).eval()
    assert sum(p.numel() for p in model.parameters()) == 46_160_474  # WRN-34-10 for 10 classes
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 3 * 5 * 2 + 3  # stem, 15 blocks of two convs, 3 projection shortcuts
    assert max(c.out_channels for c in convs) == 640
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert build_model("wrn-34-10", FMNIST).eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_size():
    # ResNet-18 (CIFAR form): 11.17 M parameters in 62 tensors.
    model = build_model("resnet18", CIFAR10)
    params = list(model.parameters())
    assert len(params) == 62 and sum(p.numel() for p in params) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


@pytest.mark.parametrize("arch", ["cnn", "resnet18", "preact-resnet18"])
def test_normalisation_is_a_buffer_and_applied(arch):
    model = build_model(arch, CIFAR10).eval()
    names = dict(model.named_buffers())
    assert torch.allclose(names["normalize.mean"].flatten(), torch.tensor(CIFAR10.mean))
    assert torch.allclose(names["normalize.std"].flatten(), torch.tensor(CIFAR10.std))
    assert not any("normalize" in name for name, _ in model.named_parameters())
    assert "normalize.mean" in model.state_dict()
    # The model sees (x - mean) / std: feeding the mean image equals feeding zeros to the rest of the net.
    x = torch.tensor(CIFAR10.mean).view(1, 3, 1, 1).expand(2, 3, 32, 32).contiguous()
    with torch.no_grad():
        direct = model(x)
        model.normalize = torch.nn.Identity()
        assert torch.allclose(direct, model(torch.zeros_like(x)), atol=1e-5)


def test_normalize_layer():
    norm = Normalize((0.5, 0.25), (0.5, 2.0))
    x = torch.tensor([1.0, 0.25]).view(1, 2, 1, 1)
    assert norm(x).flatten().tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,), (0.0,))


@pytest.mark.parametrize("arch", ["cnn", "resnet18", "preact-resnet18"])
def test_channels_last_gives_the_same_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, CIFAR10).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    # Different convolution algorithms: compare within float32 accumulation error of the logits' scale.
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_any_input_size_and_channel_count():
    spec = DatasetSpec("toy", 5, (2, 12, 9), (0.5, 0.5), (0.25, 0.25), 0.1, 0.025, "none")
    for arch in ("cnn", "resnet18", "preact-resnet18"):
        assert build_model(arch, spec)(torch.rand(2, 2, 12, 9)).shape == (2, 5)


def test_unknown_arch_lists_choices():
    assert ARCHS == ("cnn", "resnet18", "preact-resnet18", "wrn-34-10", "resnet20")
    with pytest.raises(ValueError, match="cnn, resnet18, preact-resnet18, wrn-34-10, resnet20"):
        build_model("vgg16", CIFAR10)


@pytest.mark.slow
@pytest.mark.skipif(
    not (data.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
@pytest.mark.learning
def test_cnn_learns_fashion_mnist_in_one_short_epoch():
    torch.manual_seed(0)
    x, y = data.deterministic_subset(*data.load_split("fashion-mnist", None, train=True), 12000, seed=0)
    xt, yt = data.deterministic_subset(*data.load_split("fashion-mnist", None, train=False), 2000, seed=0)
    model = build_model("cnn", FMNIST)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = data.BatchLoader(x, y, batch_size=32, shuffle=True, augment="none", device="cpu", drop_last=True)
    for xb, yb in loader.epoch(torch.Generator().manual_seed(0)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt.float() / 255).argmax(1) == yt).float().mean().item()
    # Measured on one x86-64 machine: 84.2 % (1 thread) and 85.3 % (2 threads) with the AVX-512 kernels,
    # 83.6 % and 83.1 % (1 and 2 threads) with ATEN_CPU_CAPABILITY=avx2; another machine gave 79.8 % at 2
    # threads. A seeded run moves by points between CPUs, so the bound sits well below all of them (chance
    # is 10 %).
    assert acc > 0.75
