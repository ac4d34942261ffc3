"""Datasets as uint8 tensors, deterministic subsets and splits, and a device-resident batch loader.

    images, labels = load_split("fashion-mnist", None, train=True)  # uint8 (N, C, H, W), int64 (N,)
    loader = BatchLoader(images, labels, batch_size=128, shuffle=True, augment="none", device="cuda")
    for x, y in loader.epoch(torch.Generator().manual_seed(0)):  # x float32 in [0, 1] on the device
        ...

Where the data comes from:

* Fashion-MNIST: the IDX files in torchvision's layout under ``root`` (``<root>/FashionMNIST/raw/``),
  then the files of Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``).
  The IDX format is parsed here (gzip + a 4-byte-per-dimension big-endian header).
* CIFAR-10, CIFAR-100, SVHN: torchvision's dataset classes, reading from ``root`` in their usual layout
  (``<root>/cifar-10-batches-py/``, ``<root>/cifar-100-python/``, ``<root>/train_32x32.mat``). They
  verify every file's MD5 against the published archives each time they load; nothing is downloaded
  unless ``download=True``.

The loader keeps the whole split on the training device as uint8 (CIFAR-10's training split is 150 MB)
and builds each batch with a few tensor ops: a gather of the shuffled indices, then for augmentation a
single gather that applies a random crop with 4-pixel zero padding and a horizontal flip, then the
conversion to float32 in [0, 1]. Every random draw of an epoch is made up front from one generator, so an
epoch is a pure function of that generator's state and a resumed epoch reproduces the remaining batches.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "AUGMENTATIONS",
    "DatasetNotFoundError",
    "DatasetCorruptError",
    "DEBIAN_FASHION_MNIST_DIR",
    "load_split",
    "read_idx",
    "deterministic_subset",
    "train_val_split",
    "BatchLoader",
]

AUGMENTATIONS = ("none", "crop_flip", "crop")
CROP_PADDING = 4  # zero padding on each side before the random crop (the usual CIFAR recipe)

#: Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetSpec:
    """What the trainer and the models need to know about a dataset.

    Attributes:
        name: the key in :data:`DATASETS`.
        num_classes: number of labels (labels are 0 .. num_classes - 1).
        shape: (C, H, W) of one image.
        mean, std: per-channel statistics of the training images in [0, 1]; the models normalise with
            them in their first layer, so attacks and users work in [0, 1] pixel space.
        eps: the usual L-inf radius of the threat model for this dataset.
        step_size: the usual attack step size, eps / 4.
        augment: the training augmentation, one of :data:`AUGMENTATIONS`.
    """

    name: str
    num_classes: int
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: float
    step_size: float
    augment: str


DATASETS: dict[str, DatasetSpec] = {
    # Fashion-MNIST: the threat model of most robustness papers on (Fashion-)MNIST-sized data is eps = 0.1.
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        num_classes=10,
        shape=(1, 28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        eps=0.1,
        step_size=0.1 / 4,
        augment="none",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        num_classes=10,
        shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        eps=8 / 255,
        step_size=2 / 255,
        augment="crop_flip",
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        num_classes=100,
        shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        eps=8 / 255,
        step_size=2 / 255,
        augment="crop_flip",
    ),
    # SVHN: digits, so no horizontal flip.
    "svhn": DatasetSpec(
        name="svhn",
        num_classes=10,
        shape=(3, 32, 32),
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        eps=8 / 255,
        step_size=2 / 255,
        augment="crop",
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where we looked; the message lists the places and the fix."""


class DatasetCorruptError(ValueError):
    """The dataset's files exist but are not what they should be (bad header, size or checksum)."""


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files
_FMNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Format: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions d, then d
    big-endian uint32 sizes, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise DatasetCorruptError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        raise DatasetCorruptError(
            f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()}, expected 000008XX)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetCorruptError(
            f"{path}: IDX header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_dirs(root: str | None) -> list[Path]:
    dirs = []
    if root is not None:
        dirs += [Path(root) / "FashionMNIST" / "raw", Path(root)]
    dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def _load_fashion_mnist(root: str | None, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    if download:
        if root is None:
            raise ValueError(
                "download=True needs a data root to download Fashion-MNIST into (--data-root DIR)"
            )
        torchvision = _import_torchvision("fashion-mnist")
        try:
            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        except (OSError, RuntimeError) as exc:  # no network, refused connection, bad checksum
            raise DatasetNotFoundError(
                f"downloading Fashion-MNIST into {root} failed ({exc}); without internet access install "
                f"Debian's package instead: `apt-get install dataset-fashion-mnist`"
            ) from exc
    image_stem, label_stem = _FMNIST_FILES[train]
    dirs = _fashion_mnist_dirs(root)
    for directory in dirs:
        image_path, label_path = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
        if image_path is not None and label_path is not None:
            break
    else:
        looked = "\n  ".join(str(d / (image_stem + "[.gz]")) for d in dirs)
        raise DatasetNotFoundError(
            f"Fashion-MNIST {'training' if train else 'test'} split not found; looked for\n  {looked}\n"
            f"Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download it into a "
            f"directory with `cure train --dataset fashion-mnist ... --data-root DIR --download`."
        )
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetCorruptError(f"{image_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetCorruptError(
            f"{label_path}: {labels.shape} labels for {images.shape[0]} images in {image_path}"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DatasetCorruptError(f"{label_path}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # copy: frombuffer arrays are read-only
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ------------------------------------------------------------------------------------------------
# CIFAR-10/100 and SVHN through torchvision
def _import_torchvision(name: str):
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - torchvision is installed with the "train" extra
        raise ImportError(
            f"loading {name} needs torchvision; install it with `pip install torchvision` "
            f"(or `pip install .[train]`)"
        ) from exc
    return torchvision


def _torchvision_class(name: str):
    datasets = _import_torchvision(name).datasets
    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "svhn": datasets.SVHN}[name]


def _expected_files(name: str, cls, root: Path, train: bool) -> list[tuple[Path, str | None]]:
    """(path, md5) of every file torchvision's class checks before it loads the split."""
    if name == "svhn":
        _, filename, md5 = cls.split_list["train" if train else "test"]
        return [(root / filename, md5)]
    folder = root / cls.base_folder
    files = [(folder / fname, md5) for fname, md5 in cls.train_list + cls.test_list]
    files.append((folder / cls.meta["filename"], cls.meta["md5"]))
    return files


def _load_torchvision(name: str, root: str | None, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    split = "training" if train else "test"
    get = f"`cure train --dataset {name} ... --data-root DIR --download` (needs internet access)"
    if root is None:
        raise DatasetNotFoundError(
            f"{name} needs a data directory: pass --data-root DIR (data_root) holding torchvision's files, "
            f"or fetch them with {get}"
        )
    cls = _torchvision_class(name)
    root_path = Path(root)
    if not download:
        missing = [str(p) for p, _ in _expected_files(name, cls, root_path, train) if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"{name} {split} split not found under {root_path}: missing "
                + ", ".join(missing)
                + f". Download it with {get}"
            )
    try:
        if name == "svhn":
            ds = cls(str(root_path), split="train" if train else "test", download=download)
        else:
            ds = cls(str(root_path), train=train, download=download)
    except RuntimeError as exc:
        from torchvision.datasets.utils import check_integrity

        bad = [
            str(p) for p, md5 in _expected_files(name, cls, root_path, train) if not check_integrity(p, md5)
        ]
        raise DatasetCorruptError(
            f"{name}: torchvision refused the files under {root_path} ({exc}); files whose MD5 checksum "
            f"does not match the published archive: {', '.join(bad) or 'none found'}. Delete them and "
            f"download again with {get}"
        ) from exc
    except OSError as exc:  # only the download touches the network; a plain load raises RuntimeError
        raise DatasetNotFoundError(
            f"{name}: downloading the {split} split into {root_path} failed ({exc}); copy torchvision's "
            f"files there from a machine with internet access (e.g. after running {get} there)"
        ) from exc
    if name == "svhn":
        images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already (N, 3, 32, 32)
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64).reshape(-1))
    else:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets, dtype=torch.int64)
    return images, labels


def load_split(name: str, root: str | None, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """One split of a dataset as CPU tensors: images uint8 (N, C, H, W) and labels int64 (N,).

    Args:
        name: a key of :data:`DATASETS`.
        root: the data directory (torchvision's layout); None for Fashion-MNIST from Debian's package.
        train: the training split (True) or the test split (False).
        download: let torchvision fetch missing files into ``root`` (needs internet access).

    Raises:
        ValueError: unknown dataset name.
        DatasetNotFoundError: the files are missing; the message names where we looked and the command
            that gets them.
        DatasetCorruptError: the files exist but do not parse or do not match their checksums.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if name == "fashion-mnist":
        images, labels = _load_fashion_mnist(root, train, download)
    else:
        images, labels = _load_torchvision(name, root, train, download)
    if tuple(images.shape[1:]) != spec.shape:
        raise DatasetCorruptError(f"{name}: images of shape {tuple(images.shape[1:])}, expected {spec.shape}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise DatasetCorruptError(
            f"{name}: labels span {int(labels.min())}..{int(labels.max())}, "
            f"expected 0..{spec.num_classes - 1}"
        )
    return images, labels


# ------------------------------------------------------------------------------------------------
# Subsets and splits
def _check_pair(images: Tensor, labels: Tensor) -> int:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images hold {images.shape[0]} samples but labels hold {labels.shape[0]}")
    return int(labels.shape[0])


def deterministic_subset(images: Tensor, labels: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` samples drawn without replacement by a seeded permutation, kept in their original order.

    ``n`` None or at least the number of samples: everything, unchanged. The same (data, n, seed) always
    gives the same subset, on every machine (a CPU ``torch.Generator``).
    """
    total = _check_pair(images, labels)
    if n is None or n >= total:
        return images, labels
    if n < 0:
        raise ValueError(f"n must be None or >= 0, got {n}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    index = perm[:n].sort().values.to(labels.device)
    return images[index.to(images.device)], labels[index]


def train_val_split(
    images: Tensor, labels: Tensor, val_size: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hold out ``val_size`` training samples for validation (model selection never sees the test set).

    Returns (train_images, train_labels, val_images, val_labels); the two parts are disjoint, together
    they are the whole input, and each keeps the original order. Deterministic in ``seed``.
    """
    total = _check_pair(images, labels)
    if not 0 <= val_size <= total:
        raise ValueError(f"val_size must lie in [0, {total}] (the number of samples), got {val_size}")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    val_index = perm[:val_size].sort().values
    train_index = perm[val_size:].sort().values
    return images[train_index], labels[train_index], images[val_index], labels[val_index]


# ------------------------------------------------------------------------------------------------
# Batches on the device
class BatchLoader:
    """Mini-batches of a dataset held on the training device as uint8, converted per batch.

    ``epoch(generator)`` draws, up front and in this order, the permutation of the samples (if
    ``shuffle``), then per sample the crop offsets (oy, ox) in [0, 2 * 4] and (for "crop_flip") the flip
    bit, all from ``generator`` on the generator's own device. A batch is then

        x[b, c, i, j] = P[idx_b, c, oy_b + i, ox_b + j']   with j' = W - 1 - j if flipped else j

    where P is the image zero-padded by 4 pixels on every side, followed by x / 255 in float32. The
    epoch is a function of the generator state alone, so ``epoch(g, start_batch=k)`` with g in the state
    it had at the start of the epoch yields exactly batches k, k + 1, ... of the uninterrupted epoch.
    No worker processes: everything is a tensor op on the device.

    Sharding (data-parallel training): with ``world_size`` W > 1, ``batch_size`` B is the global batch and
    rank r receives samples r * B/W .. (r + 1) * B/W - 1 of every global batch. Every rank draws the same
    permutation and augmentation from the same generator (all ranks pass generators in the same state), so
    the shards are disjoint, their union is the global batch of the single-process run, the permutation is
    redrawn every epoch (the generator is per epoch) and resume stays exact. B must be a multiple of W,
    and the last incomplete global batch is split into near-equal parts (rank r gets the elements
    ``r::W`` of it) when ``drop_last`` is off.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        augment: str,
        device: torch.device | str,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        total = _check_pair(images, labels)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 of shape (N, C, H, W), got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size {batch_size} (the global batch) must be a multiple of the world size {world_size}"
            )
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.num_samples = total
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = rank, world_size
        _, _, height, width = self.images.shape
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _draws(self, generator: torch.Generator) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The epoch's random draws, on the loader's device: permutation, crop offsets, flip bits."""
        gdev = generator.device
        n = self.num_samples
        perm = offsets = flips = None
        if self.shuffle:
            perm = torch.randperm(n, generator=generator, device=gdev)
        if self.augment in ("crop", "crop_flip"):
            offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=generator, device=gdev)
        if self.augment == "crop_flip":
            flips = torch.randint(0, 2, (n,), generator=generator, device=gdev).bool()
        move = lambda t: None if t is None else t.to(self.device, non_blocking=True)
        return move(perm), move(offsets), move(flips)

    def _augment(self, batch: Tensor, offsets: Tensor, flips: Tensor | None) -> Tensor:
        """Random crop of the zero-padded images (and horizontal flip), one gather for the whole batch."""
        b, c, h, w = batch.shape
        padded = torch.nn.functional.pad(batch, (CROP_PADDING,) * 4)
        rows = offsets[:, 0:1] + self._rows  # (B, H): source rows in the padded image
        cols = self._cols.expand(b, w)
        if flips is not None:
            cols = torch.where(flips[:, None], (w - 1) - cols, cols)
        cols = offsets[:, 1:2] + cols  # (B, W)
        wp = w + 2 * CROP_PADDING
        flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)

    def epoch(self, generator: torch.Generator, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (x float32 in [0, 1], y int64) on the device for batches ``start_batch`` .. len - 1."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(
                f"start_batch must lie in [0, {len(self)}] (batches per epoch), got {start_batch}"
            )
        perm, offsets, flips = self._draws(generator)
        for k in range(start_batch, len(self)):
            lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, self.num_samples)
            if self.world_size > 1:  # this rank's shard of the global batch
                if hi - lo == self.batch_size:
                    shard = self.batch_size // self.world_size
                    lo, hi = lo + self.rank * shard, lo + (self.rank + 1) * shard
                    index = slice(lo, hi) if perm is None else perm[lo:hi]
                else:
                    rows = torch.arange(lo + self.rank, hi, self.world_size, device=self.device)
                    index = rows if perm is None else perm[rows]
            else:
                index = slice(lo, hi) if perm is None else perm[lo:hi]  # a slice needs no gather
            batch = self.images[index]
            if offsets is not None:
                batch = self._augment(batch, offsets[index], None if flips is None else flips[index])
            yield batch.float().div_(255.0), self.labels[index]
