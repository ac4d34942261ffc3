"""``ProminenceMasker``: CURE's conserve step for any PyTorch training loop.

It owns three flat gradient buffers per parameter dtype -- natural, adversarial and update -- and
makes every ``param.grad`` a view into them, so that one kernel launch (and one DDP all-reduce)
covers all parameters. A training step then reads::

    masker = ProminenceMasker(model.parameters(), alpha=0.1, p=0.3)
    ...
    masker.zero_grad()
    with masker.capture("nat"):
        loss_nat.backward(retain_graph=True)    # dL_nat/dw lands in masker.grads_nat
    with masker.capture("adv"):
        loss_rob.backward(retain_graph=True)    # dL_rob/dw lands in masker.grads_adv
    loss.backward()                             # dL/dw lands in param.grad, as usual
    stats = masker.mask_()                      # zero the p least prominent entries per tensor
    optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from cure_kernels import backends
from cure_kernels.ops import MaskStats, rgp_mask_
from cure_kernels.validation import SUPPORTED_DTYPES, check_fraction

__all__ = ["ProminenceMasker"]

_KINDS = ("nat", "adv", "update")


class ProminenceMasker:
    """Holds the gradients CURE's Robust Gradient Prominence needs and masks ``param.grad`` with them.

    Args:
        params: the parameters to mask (those with ``requires_grad``; others are ignored).
        alpha: weight of the natural gradient in the score s = alpha*|g_nat| + (1-alpha)*|g_adv| (Eq. 6).
        p: conserved fraction: in every tensor, the p least prominent entries of the update are zeroed.
        backend: passed to :func:`cure_kernels.rgp_mask_` ("auto", "reference", "cpu", "triton", "cuda", "torch");
            checked here, against the parameters' device, so that a bad name fails now rather than at
            the first step.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, alpha: float, p: float, backend: str = "auto"):
        self.alpha = check_fraction("alpha", alpha)
        self.p = check_fraction("p", p)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__} {backend!r}")
        self.backend = backend
        self.params = [q for q in params if q.requires_grad]
        if not self.params:
            raise ValueError("params holds no parameter that requires grad; pass model.parameters()")
        devices = {q.device for q in self.params}
        if len(devices) > 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        backends.resolve_backend(backend, self.params[0].device, "rgp_mask")  # raises, naming what can run
        seen: dict[int, int] = {}
        for i, q in enumerate(self.params):
            if q.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"params[{i}] has dtype {q.dtype}; supported are float32, bfloat16, float16")
            if id(q) in seen:
                raise ValueError(f"params[{seen[id(q)]}] and params[{i}] are the same parameter (shape "
                                 f"{tuple(q.shape)}); pass each once, e.g. model.parameters(), which "
                                 f"deduplicates shared (tied) weights")
            seen[id(q)] = i
        self._layout = [(q.dtype, q.device) for q in self.params]  # what the buffers below were made for
        # One flat buffer per (kind, dtype); views in parameter order.
        self.buffers: dict[str, dict[torch.dtype, Tensor]] = {k: {} for k in _KINDS}
        self._views: dict[str, list[Tensor]] = {k: [] for k in _KINDS}
        dtypes = list(dict.fromkeys(q.dtype for q in self.params))
        for dtype in dtypes:
            members = [q for q in self.params if q.dtype == dtype]
            total = sum(q.numel() for q in members)
            for kind in _KINDS:
                self.buffers[kind][dtype] = torch.zeros(total, dtype=dtype, device=self.params[0].device)
        offsets = dict.fromkeys(dtypes, 0)
        for q in self.params:
            start, n = offsets[q.dtype], q.numel()
            for kind in _KINDS:
                self._views[kind].append(self.buffers[kind][q.dtype][start:start + n].view_as(q))
            offsets[q.dtype] = start + n
        for q, view in zip(self.params, self._views["update"]):
            if q.grad is not None:
                view.copy_(q.grad)
            q.grad = view

    @property
    def grads_nat(self) -> list[Tensor]:
        """dL_nat/dw per parameter (views into the flat natural-gradient buffers)."""
        return self._views["nat"]

    @property
    def grads_adv(self) -> list[Tensor]:
        """dL_rob/dw per parameter (views into the flat adversarial-gradient buffers)."""
        return self._views["adv"]

    @property
    def updates(self) -> list[Tensor]:
        """The parameters' ``.grad`` tensors (views into the flat update buffers)."""
        return self._views["update"]

    def _check_unchanged(self) -> None:
        """The parameters still have the dtype and device the buffers were made for (``model.to(...)`` after
        building the masker would otherwise meet PyTorch's grad dtype error at the next backward pass)."""
        for i, (q, (dtype, device)) in enumerate(zip(self.params, self._layout)):
            if q.dtype != dtype or q.device != device:
                raise RuntimeError(
                    f"params[{i}] is now {q.dtype} on {q.device}, but this ProminenceMasker was built for "
                    f"{dtype} on {device}: the model was converted or moved after the masker was "
                    f"created. Build the masker after model.to(...)")

    def zero_grad(self) -> None:
        """Zero the three gradients (update, natural and adversarial) and make every ``param.grad`` a view
        of the flat update buffer again.

        Use this instead of ``optimizer.zero_grad()``, whose default (``set_to_none=True``) drops the views.
        Like ``.grad``, the captured gradients accumulate over backward passes (micro-batches) until this
        is called.
        """
        self._check_unchanged()
        for kind in ("update", "nat", "adv"):
            for buf in self.buffers[kind].values():
                buf.zero_()
        for q, view in zip(self.params, self._views["update"]):
            q.grad = view

    @contextlib.contextmanager
    def capture(self, kind: str) -> Iterator[None]:
        """Route the gradients of backward passes inside the block into the ``kind`` buffers.

        ``kind`` is "nat" (the natural cross-entropy) or "adv" (the adversarial cross-entropy). Gradients
        add to what the buffers hold, as backward passes add to ``.grad``: several captures of the same
        kind (gradient accumulation over micro-batches) sum, and :meth:`zero_grad` clears them.
        ``param.grad`` is restored on exit, also when the block raises.

        A backward pass without ``create_graph`` accumulates into the buffers in place. With
        ``create_graph=True`` autograd accumulates out of place (``param.grad`` becomes a new tensor
        that is part of a graph); on exit its values are copied into the buffers, detached: the
        prominence scores need the values only.
        """
        if kind not in ("nat", "adv"):
            raise ValueError(f"kind must be 'nat' or 'adv', got {kind!r}")
        self._check_unchanged()
        saved = [q.grad for q in self.params]
        views = self._views[kind]
        for q, view in zip(self.params, views):
            q.grad = view
        try:
            yield
        finally:
            current = [q.grad for q in self.params]
            for q, grad in zip(self.params, saved):  # first, so that nothing below can leave .grad on our views
                q.grad = grad
            with torch.no_grad():
                for view, got in zip(views, current):
                    # Autograd accumulates in place into an existing .grad, unless grad mode is on during the
                    # backward (create_graph=True) or something replaced .grad: then keep its values.
                    # (Autograd's out-of-place accumulation gives view + gradient: the sum, like in place.)
                    if got is not None and got.data_ptr() != view.data_ptr():
                        view.copy_(got)

    def _current_updates(self) -> list[Tensor]:
        # A parameter may hold a .grad that is not our view (e.g. after optimizer.zero_grad()); mask that one.
        return [q.grad if q.grad is not None else view for q, view in zip(self.params, self._views["update"])]

    def mask_(self) -> MaskStats:
        """Zero, in place, the entries of every ``param.grad`` whose prominence is below its tensor's
        p-quantile (the conserve step). Returns the per-tensor :class:`~cure_kernels.MaskStats`."""
        return rgp_mask_(self._current_updates(), self.grads_nat, self.grads_adv,
                         alpha=self.alpha, p=self.p, backend=self.backend)

    def keep_masks(self) -> tuple[list[Tensor], MaskStats]:
        """Per-parameter masks (1 = updated, 0 = conserved) in the parameters' dtypes, without touching .grad.

        For the "freeze the whole update" mode, where conserved weights must not move at all (weight decay and
        momentum included).
        """
        if not hasattr(self, "_keep_buffers"):  # built on first use: most runs mask the gradient only
            self._keep_buffers = {d: torch.empty_like(b) for d, b in self.buffers["update"].items()}
            offsets = dict.fromkeys(self._keep_buffers, 0)
            self._keep_views = []
            for q in self.params:
                start = offsets[q.dtype]
                self._keep_views.append(self._keep_buffers[q.dtype][start:start + q.numel()].view_as(q))
                offsets[q.dtype] = start + q.numel()
        for buf in self._keep_buffers.values():
            buf.fill_(1)
        keeps = self._keep_views
        stats = rgp_mask_(keeps, self.grads_nat, self.grads_adv, alpha=self.alpha, p=self.p,
                          backend=self.backend)
        return keeps, stats
