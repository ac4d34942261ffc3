"""Dataset loading (real on-disk formats), deterministic subsets and splits, and the device batch loader."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cure import data
from cure.data import (
    DATASETS,
    BatchLoader,
    DatasetCorruptError,
    DatasetNotFoundError,
    deterministic_subset,
    load_split,
    read_idx,
    train_val_split,
)

DEBIAN_FILES = data.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
@pytest.mark.skipif(not DEBIAN_FILES.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    x, y = load_split("fashion-mnist", None, train=True)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8 and x.device.type == "cpu"
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 6000))
    xt, yt = load_split("fashion-mnist", None, train=False)
    assert xt.shape == (10000, 1, 28, 28) and xt.dtype == torch.uint8
    assert torch.equal(torch.bincount(yt, minlength=10), torch.full((10,), 1000))
    # Real images: dark background, bright garments, not constant.
    assert int(x[:100].max()) == 255 and int(x[:100].min()) == 0
    # Same bytes as parsing the files directly.
    raw = read_idx(data.DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert torch.equal(yt, torch.from_numpy(raw.astype(np.int64)))


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_torchvision_layout_takes_precedence(tmp_path, compress):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2, 8], dtype=np.uint8)
    _write_idx(raw / "t10k-images-idx3-ubyte", images, compress)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels, compress)
    x, y = load_split("fashion-mnist", str(tmp_path), train=False)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.from_numpy(images))
    assert y.tolist() == labels.tolist() and y.dtype == torch.int64
    x[0, 0, 0, 0] = 1  # the result is writable (not a view of a read-only buffer)


def test_fashion_mnist_missing_names_places_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    with pytest.raises(FileNotFoundError) as info:
        load_split("fashion-mnist", str(tmp_path / "empty"), train=True)
    msg = str(info.value)
    assert isinstance(info.value, DatasetNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root DIR --download" in msg
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in msg
    assert str(tmp_path / "no-debian") in msg


def test_idx_header_checks(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 2) + b"\0" * 8)
    with pytest.raises(DatasetCorruptError, match="unsigned bytes"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">HBB", 0, 0x08, 2) + struct.pack(">2I", 3, 4) + b"\0" * 11)
    with pytest.raises(DatasetCorruptError, match="12 bytes"):
        read_idx(short)
    ok = tmp_path / "ok"
    _write_idx(ok, np.arange(12, dtype=np.uint8).reshape(3, 4), compress=False)
    assert read_idx(ok).tolist() == np.arange(12).reshape(3, 4).tolist()


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100, svhn"):
        load_split("mnist", None, train=True)


def test_dataset_specs():
    assert set(DATASETS) == {"fashion-mnist", "cifar10", "cifar100", "svhn"}
    assert DATASETS["fashion-mnist"].eps == 0.1 and DATASETS["fashion-mnist"].shape == (1, 28, 28)
    for name in ("cifar10", "cifar100", "svhn"):
        spec = DATASETS[name]
        assert spec.eps == 8 / 255 and spec.step_size == 2 / 255 and spec.shape == (3, 32, 32)
        assert len(spec.mean) == len(spec.std) == 3
    assert DATASETS["cifar100"].num_classes == 100
    assert DATASETS["svhn"].augment == "crop"  # digits are not flipped
    for spec in DATASETS.values():
        assert spec.step_size == pytest.approx(spec.eps / 4)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 / SVHN through torchvision, from small files in the real formats
def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) HWC uint8 -> CIFAR's rows of 3072 bytes: the R plane, then G, then B."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _write_cifar10(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name, count in [(f"data_batch_{i}", 3 + i) for i in range(1, 6)] + [("test_batch", 5)]:
        imgs = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).tolist()
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": _cifar_rows(imgs),
            "filenames": ["x.png"] * count,
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (imgs, labels)
    meta = {
        "label_names": [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ]
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def _trust_written_cifar(monkeypatch, cls, folder: Path) -> None:
    """Tell torchvision the MD5s of the files we wrote (it checks every file's MD5 on each load)."""
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=_md5(folder / cls.meta["filename"])))


def test_cifar10_real_format(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    written = _write_cifar10(tmp_path, np.random.default_rng(1))
    # torchvision verifies the published MD5s at every load: our small files are refused as they are ...
    with pytest.raises(DatasetCorruptError, match="MD5") as info:
        load_split("cifar10", str(tmp_path), train=True)
    assert "data_batch_1" in str(info.value) and "--download" in str(info.value)
    # ... and accepted once torchvision expects their real checksums.
    _trust_written_cifar(monkeypatch, torchvision.datasets.CIFAR10, tmp_path / "cifar-10-batches-py")
    x, y = load_split("cifar10", str(tmp_path), train=True)
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert x.shape == (len(expected), 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(expected).permute(0, 3, 1, 2))
    assert y.dtype == torch.int64
    assert y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    xt, yt = load_split("cifar10", str(tmp_path), train=False)
    assert torch.equal(xt, torch.from_numpy(written["test_batch"][0]).permute(0, 3, 1, 2))
    assert yt.tolist() == written["test_batch"][1]
    # A corrupted file is caught by the checksum.
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DatasetCorruptError, match="data_batch_3"):
        load_split("cifar10", str(tmp_path), train=True)


def test_cifar100_real_format(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    written = {}
    for name, count in (("train", 6), ("test", 4)):
        imgs = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, size=count).tolist()
        fine[0] = 99
        entry = {
            "filenames": ["x.png"] * count,
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": _cifar_rows(imgs),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (imgs, fine)
    meta = {
        "fine_label_names": [f"c{i}" for i in range(100)],
        "coarse_label_names": [f"s{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    _trust_written_cifar(monkeypatch, torchvision.datasets.CIFAR100, folder)
    for train, name in ((True, "train"), (False, "test")):
        x, y = load_split("cifar100", str(tmp_path), train=train)
        assert torch.equal(x, torch.from_numpy(written[name][0]).permute(0, 3, 1, 2))
        assert y.tolist() == written[name][1]  # fine labels, not coarse ones
        assert int(y.max()) == 99


def test_svhn_real_format(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(3)
    written = {}
    for split, count in (("train", 6), ("test", 3)):
        imgs = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)  # N, H, W, C
        digits = rng.integers(0, 10, size=count)
        digits[0] = 0
        # SVHN's .mat files: X is (H, W, C, N) uint8, y is (N, 1) with digit 0 stored as 10.
        mat = {
            "X": imgs.transpose(1, 2, 3, 0),
            "y": np.where(digits == 0, 10, digits).astype(np.uint8)[:, None],
        }
        sio.savemat(str(tmp_path / f"{split}_32x32.mat"), mat)
        written[split] = (imgs, digits)
    cls = torchvision.datasets.SVHN
    monkeypatch.setattr(
        cls,
        "split_list",
        {
            split: [url, fname, _md5(tmp_path / fname) if (tmp_path / fname).is_file() else md5]
            for split, (url, fname, md5) in cls.split_list.items()
        },
    )
    for train, split in ((True, "train"), (False, "test")):
        x, y = load_split("svhn", str(tmp_path), train=train)
        assert x.shape == (len(written[split][1]), 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(x, torch.from_numpy(written[split][0]).permute(0, 3, 1, 2))
        assert y.dtype == torch.int64 and y.tolist() == written[split][1].tolist()
        assert y[0] == 0  # label 10 in the file is digit 0


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_torchvision_datasets_missing(tmp_path, name):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError) as info:
        load_split(name, str(tmp_path), train=True)
    msg = str(info.value)
    assert str(tmp_path) in msg and f"cure train --dataset {name} ... --data-root DIR --download" in msg
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_split(name, None, train=False)


# ------------------------------------------------------------------------------------------------
# Subsets and splits
def _toy(n: int = 50):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = torch.arange(n, dtype=torch.int64) % 7
    return images, labels


def test_deterministic_subset():
    images, labels = _toy()
    a_x, a_y = deterministic_subset(images, labels, 10, seed=3)
    b_x, b_y = deterministic_subset(images, labels, 10, seed=3)
    c_x, _ = deterministic_subset(images, labels, 10, seed=4)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert not torch.equal(a_x, c_x)
    ids = a_x[:, 0, 0, 0].long()
    assert len(set(ids.tolist())) == 10 and torch.equal(ids, ids.sort().values)  # distinct, original order
    assert torch.equal(a_y, labels[ids])  # images and labels stay paired
    for n in (None, 50, 80):
        x, y = deterministic_subset(images, labels, n, seed=0)
        assert torch.equal(x, images) and torch.equal(y, labels)
    with pytest.raises(ValueError, match="n must be"):
        deterministic_subset(images, labels, -1, seed=0)
    with pytest.raises(ValueError, match="labels hold"):
        deterministic_subset(images, labels[:-1], 3, seed=0)


def test_train_val_split():
    images, labels = _toy(40)
    tr_x, tr_y, va_x, va_y = train_val_split(images, labels, 12, seed=5)
    assert len(tr_y) == 28 and len(va_y) == 12
    tr_ids, va_ids = tr_x[:, 0, 0, 0].long(), va_x[:, 0, 0, 0].long()
    assert set(tr_ids.tolist()).isdisjoint(va_ids.tolist())
    assert sorted(tr_ids.tolist() + va_ids.tolist()) == list(range(40))
    assert torch.equal(tr_y, labels[tr_ids]) and torch.equal(va_y, labels[va_ids])
    again = train_val_split(images, labels, 12, seed=5)
    assert torch.equal(again[2], va_x)
    assert not torch.equal(train_val_split(images, labels, 12, seed=6)[2], va_x)
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(images, labels, 41, seed=0)


# ------------------------------------------------------------------------------------------------
# BatchLoader
def _images(n: int, c: int = 3, h: int = 6, w: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.uint8)  # no zero pixels
    return images, torch.arange(n, dtype=torch.int64)


def test_loader_length_and_plain_order():
    images, labels = _images(10)
    assert len(BatchLoader(images, labels, batch_size=4, shuffle=False, augment="none", device="cpu")) == 3
    loader = BatchLoader(
        images, labels, batch_size=4, shuffle=False, augment="none", device="cpu", drop_last=True
    )
    assert len(loader) == 2
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    x, y = batches[1]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, images[4:8].float() / 255)


def test_loader_shuffle_covers_every_sample_once():
    images, labels = _images(23)
    loader = BatchLoader(images, labels, batch_size=5, shuffle=True, augment="none", device="cpu")
    batches = list(loader.epoch(torch.Generator().manual_seed(1)))
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    order = torch.cat([b[1] for b in batches])
    assert sorted(order.tolist()) == list(range(23)) and order.tolist() != list(range(23))
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x, images[order].float() / 255)  # each image travels with its label


@pytest.mark.parametrize("augment", ["none", "crop", "crop_flip"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_resume_mid_epoch_is_exact(augment, shuffle):
    images, labels = _images(29)
    loader = BatchLoader(images, labels, batch_size=4, shuffle=shuffle, augment=augment, device="cpu")
    full = list(loader.epoch(torch.Generator().manual_seed(7)))
    assert len(full) == len(loader) == 8
    for start in (0, 3, 7, 8):
        resumed = list(loader.epoch(torch.Generator().manual_seed(7), start_batch=start))
        assert len(resumed) == len(full) - start
        for (xa, ya), (xb, yb) in zip(full[start:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(loader.epoch(torch.Generator().manual_seed(8)))
    if shuffle or augment != "none":
        assert any(not torch.equal(a[0], b[0]) for a, b in zip(full, other))
    with pytest.raises(ValueError, match="start_batch"):
        next(loader.epoch(torch.Generator(), start_batch=9))


def _all_crops(image: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    c, h, w = image.shape
    padded = torch.zeros(c, h + 8, w + 8, dtype=image.dtype)
    padded[:, 4 : 4 + h, 4 : 4 + w] = image
    views = [image, image.flip(-1)] if flips else [image]
    out = []
    for view in views:
        padded[:, 4 : 4 + h, 4 : 4 + w] = view
        out += [padded[:, i : i + h, j : j + w].clone() for i in range(9) for j in range(9)]
    return out


@pytest.mark.parametrize("augment", ["crop", "crop_flip"])
def test_loader_augmentation_is_a_padded_crop(augment):
    images, labels = _images(40, c=2, h=7, w=6, seed=2)
    loader = BatchLoader(images, labels, batch_size=16, shuffle=True, augment=augment, device="cpu")
    changed = flipped = 0
    for x, y in loader.epoch(torch.Generator().manual_seed(3)):
        assert x.dtype == torch.float32 and x.shape[1:] == (2, 7, 6)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        for xi, yi in zip(x, y):
            got = (xi * 255).round().to(torch.uint8)
            candidates = _all_crops(images[yi], flips=augment == "crop_flip")
            matches = [k for k, cand in enumerate(candidates) if torch.equal(cand, got)]
            assert matches, "an augmented image is not a 4-pixel-padded crop (or its flip) of its source"
            changed += not torch.equal(got, images[yi])
            flipped += min(matches) >= 81  # only matches a crop of the flipped image
    assert changed > 20  # crops with a nonzero offset happen (64 of 81 offsets move the image)
    if augment == "crop_flip":
        assert flipped > 5
    else:
        assert flipped == 0


def test_loader_argument_checks():
    images, labels = _images(4)
    with pytest.raises(ValueError, match="augment"):
        BatchLoader(images, labels, batch_size=2, shuffle=True, augment="flip", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(images, labels, batch_size=0, shuffle=True, augment="none", device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(images.float(), labels, batch_size=2, shuffle=True, augment="none", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loader_keeps_data_on_gpu_and_matches_cpu():
    images, labels = _images(37)
    cpu = BatchLoader(images, labels, batch_size=8, shuffle=True, augment="crop_flip", device="cpu")
    gpu = BatchLoader(images, labels, batch_size=8, shuffle=True, augment="crop_flip", device="cuda")
    assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8
    for (xa, ya), (xb, yb) in zip(
        cpu.epoch(torch.Generator().manual_seed(0)), gpu.epoch(torch.Generator().manual_seed(0))
    ):
        assert xb.is_cuda and torch.equal(xa, xb.cpu()) and torch.equal(ya, yb.cpu())


def test_download_only_when_asked_and_failure_is_clear(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    calls = []

    def offline(self):
        calls.append(type(self).__name__)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(FileNotFoundError, match="--download"):
        load_split("cifar10", str(tmp_path), train=True)
    assert calls == []  # no download attempt without download=True
    with pytest.raises(DatasetNotFoundError, match="network is unreachable") as info:
        load_split("cifar10", str(tmp_path), train=True, download=True)
    assert calls == ["CIFAR10"] and str(tmp_path) in str(info.value)
