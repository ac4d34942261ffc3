"""Networks for CURE and its baselines; every one takes images in [0, 1] and returns logits.

    model = build_model("resnet18", DATASETS["cifar10"])   # x in [0, 1], shape (N, 3, 32, 32) -> (N, 10)

The first layer of every model is :class:`Normalize`, ``(x - mean) / std`` with the dataset's statistics
held in buffers (saved with the weights, never trained), so attacks, checkpoints and robustness
benchmarks all work in [0, 1] pixel space.

Architectures (``ARCHS``):

* ``cnn``: two conv(3x3)-BN-ReLU-maxpool(2) stages with 32 and 64 channels, then Linear(64*H/4*W/4, 128)-
  ReLU-Linear(128, classes). Small enough to train Fashion-MNIST on a CPU.
* ``resnet18``: ResNet-18 (He et al., 2016) in its CIFAR form: a 3x3 stride-1 stem without max-pooling,
  four stages of two basic blocks (64, 128, 256, 512 channels; stride 1, 2, 2, 2), global average pooling.
* ``preact-resnet18``: the pre-activation variant (He et al., 2016b) with the same stages; BN-ReLU
  comes before each convolution and once more before the pooling.
* ``resnet20``: ResNet-20 (He et al., 2016, section 4.2, the CIFAR network): a 3x3 stem with 16 channels,
  three stages of three basic blocks (16, 32, 64 channels; stride 1, 2, 2), global average pooling and a
  linear layer; the shortcuts are identities, zero-padded in channels and subsampled where the shape
  changes (the paper's option A), so the 0.27 M parameters are all in convolutions, BN and the classifier.
* ``wrn-34-10``: WideResNet-34-10 (Zagoruyko & Komodakis, 2016) as used by TRADES and CURE: depth 34
  (5 pre-activation blocks per group), widths 16, 160, 320, 640, dropout 0.

Blocks (:func:`model_blocks`, :func:`block_names`): every architecture splits into named blocks in forward
order (e.g. stem, layer1, ..., layer4, fc for ResNet-18) that together hold every parameter exactly once;
:func:`reinit_blocks` and :func:`freeze_blocks` act on them (the layer study of the paper's section 3,
``cure train --freeze/--reinit``).

The ResNets end with adaptive average pooling, so they accept any input size (1x28x28 as well as
3x32x32). All use out-of-place residual additions and ``flatten`` after pooling, which keeps them
correct and fast in ``channels_last`` memory format.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cure.data import DatasetSpec

__all__ = [
    "ARCHS",
    "Normalize",
    "build_model",
    "SmallCNN",
    "ResNet18",
    "ResNet20",
    "PreActResNet18",
    "WideResNet",
    "model_blocks",
    "block_names",
    "check_block_names",
    "reinit_blocks",
    "freeze_blocks",
]

ARCHS = ("cnn", "resnet18", "preact-resnet18", "wrn-34-10", "resnet20")


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers (in the state dict, not parameters)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _init_weights(module: nn.Module) -> None:
    """He (fan-out) initialisation for convolutions, BN at identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


# ------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv-BN-ReLU-maxpool (32 ch), conv-BN-ReLU-maxpool (64 ch), Linear-ReLU-Linear."""

    def __init__(self, spec: DatasetSpec, hidden: int = 128) -> None:
        super().__init__()
        c, h, w = spec.shape
        if h < 4 or w < 4:
            raise ValueError(f"the cnn needs images of at least 4x4 pixels, got shape {spec.shape}")
        self.normalize = Normalize(spec.mean, spec.std)
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * (h // 4) * (w // 4), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, spec.num_classes),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))


# ------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem (64 ch, stride 1), stages [2, 2, 2, 2], avgpool, linear."""

    def __init__(self, spec: DatasetSpec) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.conv1 = _conv3x3(spec.shape[0], 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, spec.num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


# ------------------------------------------------------------------------------------------------
class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut (1x1 conv of the pre-activated input when the shape changes).

    With ``dropout`` > 0 a dropout layer sits between the two convolutions (WideResNet's variant).
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + skip


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18: 3x3 stem, stages [2, 2, 2, 2] of pre-activation blocks, BN-ReLU, avgpool."""

    def __init__(self, spec: DatasetSpec) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.conv1 = _conv3x3(spec.shape[0], 64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, spec.num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.relu(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


# ------------------------------------------------------------------------------------------------
class WideResNet(nn.Module):
    """WideResNet-depth-widen: stem conv (16 ch), three groups of (depth - 4) / 6 pre-activation blocks
    with 16k, 32k, 64k channels (k = widen; strides 1, 2, 2), BN-ReLU, avgpool, linear."""

    def __init__(self, spec: DatasetSpec, depth: int = 34, widen: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.normalize = Normalize(spec.mean, spec.std)
        self.conv1 = _conv3x3(spec.shape[0], widths[0])
        groups, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            blocks = [
                PreActBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout) for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], spec.num_classes)
        _init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))

# ------------------------------------------------------------------------------------------------
class ZeroPadBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a parameter-free shortcut, then ReLU. Where the shape changes, the
    shortcut takes every ``stride``-th pixel of x and appends zero channels (He et al. 2016, option A)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout < cin:
            raise ValueError(f"a zero-padding shortcut cannot reduce channels ({cin} -> {cout})")
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.extra_channels = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x
        if self.stride != 1:
            skip = skip[:, :, :: self.stride, :: self.stride]  # same size as a 3x3, padding-1 strided conv
        if self.extra_channels:
            before = self.extra_channels // 2
            skip = nn.functional.pad(skip, (0, 0, 0, 0, before, self.extra_channels - before))
        return self.relu(out + skip)


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR network with n = 3): 3x3 stem (16 ch), stages of three blocks with
    16, 32, 64 channels (strides 1, 2, 2), avgpool, linear; 0.27 M parameters for 10 classes."""

    def __init__(self, spec: DatasetSpec, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.conv1 = _conv3x3(spec.shape[0], 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [ZeroPadBlock(cin, cout, stride)]
            blocks += [ZeroPadBlock(cout, cout, 1) for _ in range(blocks_per_stage - 1)]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, spec.num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def build_model(arch: str, spec: DatasetSpec) -> nn.Module:
    """A freshly initialised ``arch`` for ``spec`` (inputs in [0, 1] of shape spec.shape, logits out)."""
    if arch == "cnn":
        return SmallCNN(spec)
    if arch == "resnet18":
        return ResNet18(spec)
    if arch == "preact-resnet18":
        return PreActResNet18(spec)
    if arch == "wrn-34-10":
        return WideResNet(spec, depth=34, widen=10, dropout=0.0)
    if arch == "resnet20":
        return ResNet20(spec)
    raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


# ------------------------------------------------------------------------------------------------
# Named blocks: the layer study of the paper's section 3 (re-initialise / freeze whole blocks)
def model_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The named blocks of a network from :func:`build_model`, in forward order.

    * cnn: ``conv1`` (first conv-BN), ``conv2`` (second conv-BN), ``fc1`` (hidden linear), ``fc2``
      (classifier);
    * resnet18: ``stem`` (conv1, bn1), ``layer1`` ... ``layer4``, ``fc`` (the linear classifier);
    * resnet20: ``stem`` (conv1, bn1), ``layer1`` ... ``layer3``, ``fc``;
    * preact-resnet18: ``stem`` (conv1), ``layer1`` ... ``layer4``, ``fc`` (the final BN and the linear
      classifier);
    * wrn-34-10: ``stem`` (conv1), ``block1`` ... ``block3``, ``fc`` (the final BN and the linear classifier).

    Together the blocks hold every parameter of the model exactly once. A block that spans several
    modules is returned as an ``nn.ModuleDict`` of the model's own modules (no copies), so acting on a
    block acts on the model.
    """
    if isinstance(model, SmallCNN):
        f, c = model.features, model.classifier
        return {
            "conv1": nn.ModuleDict({"conv": f[0], "bn": f[1]}),
            "conv2": nn.ModuleDict({"conv": f[4], "bn": f[5]}),
            "fc1": c[0],
            "fc2": c[2],
        }
    if isinstance(model, (ResNet18, ResNet20)):
        stages = 4 if isinstance(model, ResNet18) else 3
        layers = tuple(f"layer{i}" for i in range(1, stages + 1))
        return {
            "stem": nn.ModuleDict({"conv1": model.conv1, "bn1": model.bn1}),
            **{name: getattr(model, name) for name in layers},
            "fc": model.linear,
        }
    if isinstance(model, PreActResNet18):
        return {
            "stem": model.conv1,
            **{name: getattr(model, name) for name in ("layer1", "layer2", "layer3", "layer4")},
            "fc": nn.ModuleDict({"bn": model.bn, "linear": model.linear}),
        }
    if isinstance(model, WideResNet):
        return {
            "stem": model.conv1,
            **{name: getattr(model, name) for name in ("block1", "block2", "block3")},
            "fc": nn.ModuleDict({"bn": model.bn, "fc": model.fc}),
        }
    raise TypeError(f"no named blocks are defined for {type(model).__name__}; build the model with build_model")


def block_names(arch: str, spec: DatasetSpec | None = None) -> tuple[str, ...]:
    """The block names of ``arch`` in forward order (the model is built on the meta device: no memory)."""
    if spec is None:
        from cure.data import DATASETS

        spec = DATASETS["fashion-mnist"]
    with torch.device("meta"):
        return tuple(model_blocks(build_model(arch, spec)))


def check_block_names(arch: str, names, option: str = "blocks") -> tuple[str, ...]:
    """``names`` as a tuple after checking each is a block of ``arch``, once; ValueError listing the valid ones."""
    valid = block_names(arch)
    names = tuple(names)
    for name in names:
        if name not in valid:
            raise ValueError(
                f"{option}: {name!r} is not a block of {arch}; its blocks are {', '.join(valid)} "
                f"(`cure train --arch {arch} --list-blocks`)"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{option} names {', '.join(repeated)} more than once")
    return names


def reinit_blocks(model: nn.Module, names, *, arch: str, spec: DatasetSpec, seed: int) -> None:
    """Return the named blocks of ``model`` to a fresh initialisation: the parameters and buffers (BatchNorm
    statistics) of the same blocks of ``build_model(arch, spec)`` built under ``torch.manual_seed(seed)``.

    The global random state is left as it was. Other blocks are untouched.
    """
    names = check_block_names(arch, names, "reinit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = build_model(arch, spec)
    blocks, fresh_blocks = model_blocks(model), model_blocks(fresh)
    with torch.no_grad():
        for name in names:
            blocks[name].load_state_dict(fresh_blocks[name].state_dict())


def freeze_blocks(model: nn.Module, names, *, arch: str) -> int:
    """Set ``requires_grad = False`` on every parameter of the named blocks; return how many entries that is.

    The trainer leaves such parameters out of the optimizer (no update, momentum or weight decay) and out
    of CURE's prominence mask. BatchNorm running statistics of a frozen block still follow the batches in
    train mode, as in the official code's layer study.
    """
    names = check_block_names(arch, names, "freeze")
    blocks = model_blocks(model)
    frozen = 0
    for name in names:
        for q in blocks[name].parameters():
            q.requires_grad_(False)
            frozen += q.numel()
    return frozen
