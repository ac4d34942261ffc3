"""Linear CKA between the block outputs of two models (Kornblith et al., ICML 2019).

    from cure.cka import linear_cka, compare_checkpoints
    linear_cka(X, Y)                     # X: (n, p), Y: (n, q) features of the same n inputs -> float
    result = compare_checkpoints("runs/st/last.pt", "runs/cure/last.pt", samples=512, adversarial=True)

Estimator. The standard (biased) linear CKA of Kornblith et al. (2019), Eq. (5) with the linear kernel:
with the columns of X and Y centred,

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <K, L>_F / (||K||_F ||L||_F),   K = X X^T, L = Y Y^T (the centred Gram matrices).

``linear_cka(..., unbiased=True)`` instead plugs in the unbiased HSIC estimator (Song et al., 2012; the
form used by Nguyen et al., 2021), which needs n >= 4. Both are computed in float64: each feature matrix is
first divided by its largest absolute entry (CKA is invariant to isotropic scaling), then centred, and the
n x n Gram matrix is formed (wide layers have far more features than samples). CKA is NaN when either
representation is constant over the samples (a zero centred Gram matrix).

Blocks. :data:`BLOCKS` lists, per architecture, the modules whose outputs are compared (the output of each
block, flattened per sample): for ``cnn`` its two conv stages (after pooling), the hidden fully connected
layer (after its ReLU) and the logits; for the ResNets the stem, ``layer1`` .. ``layer4`` (``layer3`` for
ResNet-20) and the final linear layer (``fc``); for WideResNet the stem, ``block1`` .. ``block3`` and ``fc``.

Inputs. A deterministic subset of the test split (the data seed of the first checkpoint's run). With
``adversarial`` each model also sees its own PGD-20 adversarial examples of the same images (L-inf, the
run's eps, step eps/4, random start), and CKA is computed between the two models' representations of their
adversarial inputs (``adv_source`` "each"); ``adv_source`` "a" or "b" feeds both models the adversarial
examples crafted against that one model instead.

Outputs of :func:`run` (``cure analyze cka``): ``cka.csv`` (layer, cka[, cka_adversarial]) for the blocks
both models have, ``cka_matrix.csv`` (every block of a against every block of b, per input kind) and
``cka.png`` (heat maps of those matrices, the matching blocks on the diagonal).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BLOCKS",
    "CKAError",
    "CKAResult",
    "linear_cka",
    "gram",
    "block_modules",
    "extract_features",
    "compare_checkpoints",
    "write_outputs",
]

#: Per architecture: (block name, module path in the model) in forward order: the module whose output is the
#: block's representation. The names of the ResNets and the WideResNet are those of
#: :func:`cure.models.model_blocks` (``--freeze`` / ``--reinit``); the cnn's are finer (its two conv stages
#: are compared after pooling).
BLOCKS: dict[str, tuple[tuple[str, str], ...]] = {
    "cnn": (
        ("stage1", "features.3"),
        ("stage2", "features.7"),
        ("fc1", "classifier.1"),
        ("logits", "classifier.2"),
    ),
    "resnet18": (
        ("stem", "relu"),
        ("layer1", "layer1"),
        ("layer2", "layer2"),
        ("layer3", "layer3"),
        ("layer4", "layer4"),
        ("fc", "linear"),
    ),
    "preact-resnet18": (
        ("stem", "conv1"),
        ("layer1", "layer1"),
        ("layer2", "layer2"),
        ("layer3", "layer3"),
        ("layer4", "layer4"),
        ("fc", "linear"),
    ),
    "resnet20": (
        ("stem", "relu"),
        ("layer1", "layer1"),
        ("layer2", "layer2"),
        ("layer3", "layer3"),
        ("fc", "linear"),
    ),
    "wrn-34-10": (
        ("stem", "conv1"),
        ("block1", "block1"),
        ("block2", "block2"),
        ("block3", "block3"),
        ("fc", "fc"),
    ),
}

#: Refuse to hold more than this many bytes of float32 features (both models, all blocks) in memory.
MAX_FEATURE_BYTES = 8 * 2**30


class CKAError(ValueError):
    """Bad input to a CKA computation (shapes, sample counts, unknown architecture, memory)."""


# ------------------------------------------------------------------------------------------------
def _as_matrix(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dim() < 2:
        raise CKAError(f"{name} must have a sample axis and at least one feature axis, got shape {tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1).to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise CKAError(f"{name} holds non-finite values")
    return t


def gram(x: Tensor | np.ndarray, device: torch.device | str | None = None) -> Tensor:
    """The centred linear Gram matrix (n, n) of features ``x`` (n, ...), float64, after scaling ``x`` by its
    largest absolute entry (for stability; CKA does not change). ``device``: where the product is computed
    (default the CPU); the result is returned on the CPU."""
    t = _as_matrix(x, "features")
    if device is not None:
        t = t.to(device)
    peak = t.abs().max()
    if peak > 0:
        t = t / peak
    t = t - t.mean(dim=0, keepdim=True)
    return (t @ t.T).cpu()


def _hsic_biased(k: Tensor, gl: Tensor) -> Tensor:
    return (k * gl).sum()  # both already centred: tr(K H L H) = <K, L>


def _hsic_unbiased(k: Tensor, gl: Tensor) -> Tensor:
    """Song et al. (2012): unbiased HSIC from Gram matrices with their diagonals set to zero."""
    n = k.shape[0]
    k = k.clone()
    gl = gl.clone()
    k.fill_diagonal_(0.0)
    gl.fill_diagonal_(0.0)
    ones = torch.ones(n, dtype=k.dtype)
    kl = k @ gl
    term = torch.trace(kl) + (k.sum() * gl.sum()) / ((n - 1) * (n - 2)) - 2.0 * (ones @ kl @ ones) / (n - 2)
    return term / (n * (n - 3))


def cka_from_grams(k: Tensor, gl: Tensor, *, unbiased: bool = False) -> float:
    """CKA from two Gram matrices of the same n samples (see :func:`linear_cka`)."""
    if k.shape != gl.shape or k.dim() != 2 or k.shape[0] != k.shape[1]:
        raise CKAError(f"Gram matrices must both be (n, n), got {tuple(k.shape)} and {tuple(gl.shape)}")
    n = k.shape[0]
    if unbiased:
        if n < 4:
            raise CKAError(f"the unbiased estimator needs at least 4 samples, got {n}")
        hsic = _hsic_unbiased  # invariant to centring the features, so centred Gram matrices are fine
    else:
        if n < 2:
            raise CKAError(f"CKA needs at least 2 samples, got {n}")
        hsic = _hsic_biased
    kl, kk, ll = hsic(k, gl), hsic(k, k), hsic(gl, gl)
    denom = torch.sqrt(kk * ll)
    if not denom > 0:
        return math.nan
    return float(kl / denom)


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray, *, unbiased: bool = False) -> float:
    """Linear CKA between features ``x`` (n, ...) and ``y`` (n, ...) of the same n inputs, in float64.

    Standard estimator (default): <K, L> / (||K|| ||L||) with centred linear Gram matrices (Kornblith et
    al., 2019). ``unbiased=True``: the unbiased HSIC estimator in the same ratio (needs n >= 4; the value can
    be slightly negative). NaN when either representation is constant over the samples.
    """
    a = _as_matrix(x, "x")
    b = _as_matrix(y, "y")
    if a.shape[0] != b.shape[0]:
        raise CKAError(f"x and y must hold the same samples; got {a.shape[0]} and {b.shape[0]} rows")
    return cka_from_grams(gram(a), gram(b), unbiased=unbiased)


# ------------------------------------------------------------------------------------------------
def block_modules(model: nn.Module, arch: str) -> list[tuple[str, nn.Module]]:
    """(name, module) for each block of :data:`BLOCKS` ``[arch]`` in ``model``."""
    if arch not in BLOCKS:
        raise CKAError(f"no block list for arch {arch!r}; known: {', '.join(BLOCKS)}")
    out = []
    for name, path in BLOCKS[arch]:
        try:
            out.append((name, model.get_submodule(path)))
        except AttributeError as exc:
            raise CKAError(f"{arch} model has no module {path!r} (block {name}): {exc}") from exc
    return out


@torch.no_grad()
def extract_features(
    model: nn.Module, arch: str, images: Tensor, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """{block: (n, features) float32 CPU tensor} of ``model``'s block outputs on ``images`` (n, C, H, W) in
    [0, 1]. The model runs in eval mode; each output is copied when produced (later in-place ops such as
    ReLU(inplace=True) cannot change it)."""
    blocks = block_modules(model, arch)
    store: dict[str, list[Tensor]] = {name: [] for name, _ in blocks}

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            store[name].append(output.detach().flatten(1).to("cpu", torch.float32, copy=True))

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in blocks]
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, images.shape[0], batch_size):
            model(images[lo : lo + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in store.items()}


@dataclass
class CKAResult:
    """CKA of two models' blocks. ``matrix[kind][i][j]``: block i of a against block j of b."""

    blocks_a: list[str]
    blocks_b: list[str]
    samples: int
    estimator: str
    matrix: dict[str, list[list[float]]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def diagonal(self, kind: str) -> dict[str, float]:
        """{block: CKA} for the blocks both models have (by name)."""
        m = self.matrix[kind]
        return {name: m[i][self.blocks_b.index(name)] for i, name in enumerate(self.blocks_a) if name in self.blocks_b}


def _cka_matrix(fa: dict[str, Tensor], fb: dict[str, Tensor], unbiased: bool, device) -> list[list[float]]:
    grams_b = {name: gram(f, device) for name, f in fb.items()}
    rows = []
    for f in fa.values():
        ka = gram(f, device)
        rows.append([cka_from_grams(ka, lb, unbiased=unbiased) for lb in grams_b.values()])
    return rows


def _pgd_examples(model: nn.Module, images: Tensor, labels: Tensor, *, eps: float, batch_size: int, device, seed: int):
    from cure.attacks import pgd

    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    model.eval()
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo : lo + batch_size].to(device)
        y = labels[lo : lo + batch_size].to(device)
        adv = pgd(
            model, x, y, eps=eps, step_size=eps / 4, steps=20, norm="linf", loss="ce", random_start=True, generator=gen
        )
        out.append(adv.detach().cpu())
    return torch.cat(out)


def compare_checkpoints(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    which_a: str = "model",
    which_b: str = "model",
    samples: int = 512,
    adversarial: bool = False,
    adv_source: str = "each",
    eps: float | None = None,
    unbiased: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    data_root: str | None = None,
    seed: int = 0,
) -> CKAResult:
    """Linear CKA between every block of checkpoint ``a`` and every block of checkpoint ``b`` on ``samples``
    test images (natural, and with ``adversarial`` PGD-20 examples too). Both runs must use the same dataset.
    """
    from cure.checkpoint import load_checkpoint, load_model
    from cure.data import DATASETS, deterministic_subset, load_split

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise CKAError(f"samples must be an integer >= 2, got {samples!r}")
    if adv_source not in ("each", "a", "b"):
        raise CKAError(f"adv_source must be 'each', 'a' or 'b', got {adv_source!r}")
    if unbiased and samples < 4:
        raise CKAError(f"the unbiased estimator needs samples >= 4, got {samples}")
    cfg_a = load_checkpoint(a)["config"]
    cfg_b = load_checkpoint(b)["config"]
    if cfg_a["dataset"] != cfg_b["dataset"]:
        raise CKAError(
            f"{a} was trained on {cfg_a['dataset']} but {b} on {cfg_b['dataset']}; CKA needs the same inputs"
        )
    for path, cfg in ((a, cfg_a), (b, cfg_b)):
        if cfg["arch"] not in BLOCKS:
            raise CKAError(f"{path}: no block list for arch {cfg['arch']!r}")
    device = torch.device(device)
    spec = DATASETS[cfg_a["dataset"]]
    images, labels = load_split(cfg_a["dataset"], data_root or cfg_a.get("data_root"), train=False, download=False)
    if samples < len(labels):
        images, labels = deterministic_subset(images, labels, samples, seed=int(cfg_a.get("data_seed", 0)))
    n = int(len(labels))
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    model_a = load_model(a, which=which_a, map_location=device)
    model_b = load_model(b, which=which_b, map_location=device)
    kinds = ["natural"] + (["adversarial"] if adversarial else [])
    per_sample = 0
    for model, arch in ((model_a, cfg_a["arch"]), (model_b, cfg_b["arch"])):
        probe = extract_features(model, arch, x[:1], device=device)
        per_sample += sum(f.shape[1] for f in probe.values())
    need = per_sample * n * 4 * len(kinds)
    if need > MAX_FEATURE_BYTES:
        raise CKAError(f"{n} samples need {need / 2**30:.1f} GiB of block features; use fewer samples (--samples)")
    if eps is None:
        eps = cfg_a.get("eps") if cfg_a.get("eps") is not None else spec.eps
    result = CKAResult(
        blocks_a=[name for name, _ in BLOCKS[cfg_a["arch"]]],
        blocks_b=[name for name, _ in BLOCKS[cfg_b["arch"]]],
        samples=n,
        estimator="unbiased" if unbiased else "standard",
        meta={
            "a": f"{a} ({which_a}; {cfg_a['method']}, {cfg_a['arch']})",
            "b": f"{b} ({which_b}; {cfg_b['method']}, {cfg_b['arch']})",
            "dataset": cfg_a["dataset"],
            "eps": f"{eps:.4g}",
        },
    )
    for kind in kinds:
        if kind == "natural":
            xa = xb = x
        else:
            adv = {}
            for tag, model in (("a", model_a), ("b", model_b)):
                if adv_source in ("each", tag):
                    adv[tag] = _pgd_examples(
                        model, x, labels, eps=float(eps), batch_size=batch_size, device=device, seed=seed
                    )
            xa = adv["a"] if adv_source == "each" else adv[adv_source]
            xb = adv["b"] if adv_source == "each" else adv[adv_source]
        fa = extract_features(model_a, cfg_a["arch"], xa, batch_size=batch_size, device=device)
        fb = extract_features(model_b, cfg_b["arch"], xb, batch_size=batch_size, device=device)
        result.matrix[kind] = _cka_matrix(fa, fb, unbiased, device)
        del fa, fb
    return result


# ------------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.6f}"


def write_outputs(result: CKAResult, out: str | os.PathLike) -> list[Path]:
    """Write cka.csv, cka_matrix.csv and cka.png into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = list(result.matrix)
    paths = []
    diag = {kind: result.diagonal(kind) for kind in kinds}
    with open(out / "cka.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["layer", "cka"] + (["cka_adversarial"] if "adversarial" in kinds else []))
        for name in diag["natural"]:
            w.writerow([name] + [_fmt(diag[kind][name]) for kind in kinds])
    paths.append(out / "cka.csv")
    with open(out / "cka_matrix.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["inputs", "layer_a", "layer_b", "cka"])
        for kind in kinds:
            for i, la in enumerate(result.blocks_a):
                for j, lb in enumerate(result.blocks_b):
                    w.writerow([kind, la, lb, _fmt(result.matrix[kind][i][j])])
    paths.append(out / "cka_matrix.csv")

    fig, axes = plt.subplots(
        1,
        len(kinds),
        figsize=(1.2 + 1.0 * len(result.blocks_b) * len(kinds) + 1.5, 1.2 + 0.8 * len(result.blocks_a)),
        squeeze=False,
    )
    for ax, kind in zip(axes[0], kinds):
        m = np.array(result.matrix[kind], dtype=np.float64)
        im = ax.imshow(np.ma.masked_invalid(m), vmin=0.0, vmax=1.0, cmap="magma", origin="upper")
        ax.set_xticks(range(len(result.blocks_b)), result.blocks_b, rotation=45, ha="right")
        ax.set_yticks(range(len(result.blocks_a)), result.blocks_a)
        ax.set_xlabel("block of model b")
        ax.set_ylabel("block of model a")
        ax.set_title(f"{kind} inputs")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                text = "nan" if math.isnan(m[i, j]) else f"{m[i, j]:.2f}"
                colour = "black" if not math.isnan(m[i, j]) and m[i, j] > 0.6 else "white"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=f"linear CKA ({result.estimator})")
    fig.suptitle(
        f"linear CKA on {result.samples} {result.meta.get('dataset', '')} test images\n"
        f"a: {result.meta.get('a', '')}\nb: {result.meta.get('b', '')}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out / "cka.png", dpi=120)
    plt.close(fig)
    paths.append(out / "cka.png")
    return paths


def format_table(result: CKAResult) -> str:
    """The matching blocks' CKA as a text table."""
    kinds = list(result.matrix)
    diag = {kind: result.diagonal(kind) for kind in kinds}
    lines = [f"{'block':<10}" + "".join(f"{k:>13}" for k in kinds)]
    for name in diag["natural"]:
        lines.append(f"{name:<10}" + "".join(f"{_fmt(diag[k][name]):>13}" for k in kinds))
    if not diag["natural"]:
        lines.append("(the two architectures share no block names; see cka_matrix.csv)")
    return "\n".join(lines)


def run(args) -> int:
    """``cure analyze cka``: compare the checkpoints, print the table, write the files."""
    from cure.device import select_device

    result = compare_checkpoints(
        args.a,
        args.b,
        which_a=args.a_which,
        which_b=args.b_which,
        samples=args.samples,
        adversarial=args.adversarial,
        adv_source=args.adv_source,
        eps=args.eps,
        unbiased=args.estimator == "unbiased",
        batch_size=args.batch_size,
        device=select_device(args.device),
        data_root=args.data_root,
        seed=args.seed,
    )
    paths = write_outputs(result, args.out)
    print(
        f"linear CKA ({result.estimator}) on {result.samples} test images of {result.meta['dataset']}\n"
        f"  a: {result.meta['a']}\n  b: {result.meta['b']}"
    )
    print(format_table(result))
    print("written: " + ", ".join(str(p) for p in paths))
    return 0
