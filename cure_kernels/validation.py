"""Argument checks shared by every op. They read metadata only: no host synchronisation.

Every message names the argument, the offending value, and what to do instead. The whole call is
checked before anything is modified, so a rejected call leaves every tensor untouched.

The tensors an op writes are held to the rules of PyTorch's own in-place ops:

* no internal overlap: a written tensor in which two elements share one memory location (an
  ``expand()``-ed tensor) is refused, as ``Tensor.add_`` refuses it;
* no mutual overlap: two written tensors (in one list or in two written lists) must not share memory.
  A written tensor may alias a tensor the op only reads (an update that is also its ``grads_nat``):
  every backend reads its inputs before it writes the aliased element;
* no inference tensors written outside ``torch.inference_mode()``;
* dense (strided), unquantized tensors of a supported floating dtype, all on one device that holds
  data (the ``meta`` device does not).

The checks of one call of :func:`check_tensor_lists` cost a handful of attribute reads per tensor:
the common, valid case goes through list-wide comparisons, and only a failing call walks the lists
again to name the offending tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from itertools import chain
from operator import add, attrgetter, le

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)
_DTYPE_NAMES = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)

# A strided tensor whose overlap PyTorch cannot decide from its strides alone is checked by listing its
# element offsets; above this many elements it is refused instead (a 128 MiB int64 temporary).
_ENUMERATION_LIMIT = 1 << 24

_dtype, _device, _layout, _nbytes = (attrgetter(a) for a in ("dtype", "device", "layout", "nbytes"))
_size = Tensor.size  # t.size() is cheaper than t.shape; both return the same torch.Size
_requires_grad = attrgetter("requires_grad")


# --- scalars ---------------------------------------------------------------------------------------
def _real(name: str, value: object, expected: str) -> float:
    """``value`` as a Python float when it is a real number (Python or numpy scalar, not a bool)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python float, got a tensor ({value!r}); pass float({name}) "
                        f"(reading a tensor would synchronise the device)")
    raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float in [0, 1]; ``ValueError``/``TypeError`` naming ``name`` otherwise.

    Python floats and ints and numpy scalars (``np.float32(0.3)`` included, as its exact value) are
    accepted; bools and tensors are not.
    """
    if type(value) is not float:
        value = _real(name, value, "a float in [0, 1]")
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    return value


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a finite float >= 0 (the same scalar types as :func:`check_fraction`)."""
    if type(value) is not float:
        value = _real(name, value, "a non-negative float")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


# --- tensor lists ----------------------------------------------------------------------------------
def _as_tensor_list(name: str, tensors: object, compiling: bool) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        raise TypeError(f"{name} must be a sequence of tensors (one per parameter), got a single "
                        f"tensor of shape {tuple(tensors.shape)}; wrap it in a list")
    try:
        out = list(tensors)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of tensors, got {type(tensors).__name__}") from None
    if compiling or not all(issubclass(tp, Tensor) for tp in set(map(type, out))):
        for i, t in enumerate(out):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


def check_tensor_lists(names: Sequence[str], lists: Sequence[object],
                       written: Sequence[int] = (0,)) -> list[list[Tensor]]:
    """Check the parallel tensor lists of one call and return them as lists.

    Equal lengths; per index, the shape and dtype of ``names[0]``'s tensor; dense tensors of a supported
    floating dtype; one device, not ``meta``. ``lists[k]`` for k in ``written`` are written in place:
    ``lists[0]`` must not require grad under grad mode (when it is among them), and the written tensors
    must pass the in-place rules of this module's docstring (checked in eager mode; under
    ``torch.compile`` the tensors are fake and hold no addresses).
    """
    compiling = torch.compiler.is_compiling()
    tls = [_as_tensor_list(n, tl, compiling) for n, tl in zip(names, lists)]
    if compiling:  # Dynamo traces plain attribute reads (not map over Tensor methods); at trace time only
        _find_fault(names, tls, written)
        return tls
    first = tls[0]
    shapes, dtypes = list(map(_size, first)), list(map(_dtype, first))
    tensors = list(chain.from_iterable(tls))
    devices = set(map(_device, tensors))
    ok = (all(len(tl) == len(first) for tl in tls)
          and _SUPPORTED.issuperset(dtypes)
          and all(list(map(_size, tl)) == shapes and list(map(_dtype, tl)) == dtypes for tl in tls[1:])
          and len(devices) <= 1
          and set(map(_layout, tensors)) <= {torch.strided}
          and not (0 in written and torch.is_grad_enabled() and any(map(_requires_grad, first))))
    if not ok or (devices and next(iter(devices)).type == "meta"):
        _find_fault(names, tls, written)
        raise AssertionError("check_tensor_lists: a list-wide check failed but no tensor was found at fault")
    if first:
        _check_written(names, tls, written)
    return tls


def _find_fault(names: Sequence[str], tls: list[list[Tensor]], written: Sequence[int]) -> None:
    """Walk the lists tensor by tensor and raise the error for the first offending one, if any."""
    lengths = [len(tl) for tl in tls]
    if len(set(lengths)) > 1:
        described = ", ".join(f"len({n})={k}" for n, k in zip(names, lengths))
        raise ValueError(f"tensor lists must have equal lengths, got {described}")
    device = None
    for i, group in enumerate(zip(*tls)):
        first = group[0]
        for name, t in zip(names, group):
            if t.layout != torch.strided:
                raise TypeError(f"{name}[{i}] has layout {t.layout}; only dense (strided) tensors are "
                                f"supported: pass {name}[{i}].to_dense()")
            if t.is_quantized:
                raise TypeError(f"{name}[{i}] is a quantized tensor ({t.dtype}); pass a floating tensor, "
                                f"e.g. {name}[{i}].dequantize()")
            if t.dtype not in _SUPPORTED:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; supported dtypes are {_DTYPE_NAMES}")
            if t.shape != first.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but {names[0]}[{i}] has "
                                 f"shape {tuple(first.shape)}; corresponding tensors must match")
            if t.dtype != first.dtype:
                raise TypeError(f"{name}[{i}] has dtype {t.dtype} but {names[0]}[{i}] has dtype "
                                f"{first.dtype}; corresponding tensors must match")
            if device is None:
                device = t.device
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {names[0]}[0] is on {device}; "
                                 f"all tensors of one call must be on the same device")
        if 0 in written and first.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{names[0]}[{i}] requires grad and would be modified in place; "
                               f"pass .grad tensors or call under torch.no_grad()")
    if device is not None and device.type == "meta":
        raise ValueError(f"{names[0]}[0] is on the meta device, which holds shapes but no data, and this op "
                         f"computes from the values; pass CPU or CUDA tensors (torch.compile traces the op "
                         f"with fake tensors through its registered fake implementation)")


def _check_written(names: Sequence[str], tls: list[list[Tensor]], written: Sequence[int]) -> None:
    """The in-place rules (module docstring) for the written lists ``tls[k]``, k in ``written``."""
    if not torch.is_inference_mode_enabled():
        for k in written:
            if any(map(Tensor.is_inference, tls[k])):
                i = next(i for i, t in enumerate(tls[k]) if t.is_inference())
                raise RuntimeError(
                    f"{names[k]}[{i}] is an inference tensor (created under torch.inference_mode()) and this op "
                    f"writes it in place: Inplace update to inference tensor outside InferenceMode is not "
                    f"allowed; clone it outside inference mode to get a normal tensor, or call the op inside "
                    f"torch.inference_mode()")
    # Fast path: every written tensor contiguous; sorted by address, each must end before the next begins.
    if all(all(map(Tensor.is_contiguous, tls[k])) for k in written):
        starts = list(chain.from_iterable(map(Tensor.data_ptr, tls[k]) for k in written))
        sizes = list(chain.from_iterable(map(_nbytes, tls[k]) for k in written))
        if 0 not in sizes:  # (an empty tensor may sit at any address)
            order = sorted(zip(starts, map(add, starts, sizes)))
            if all(map(le, [end for _, end in order[:-1]], [start for start, _ in order[1:]])):
                return
    _check_written_spans(names, tls, written)


def _check_written_spans(names: Sequence[str], tls: list[list[Tensor]], written: Sequence[int]) -> None:
    spans = []  # (first byte, one past the last byte, dense, list, index) of every non-empty written tensor
    for k in written:
        spans.extend((_strided_span(names[k], i, t) if not t.is_contiguous()
                      else (t.data_ptr(), t.data_ptr() + t.nbytes, True)) + (k, i)
                     for i, t in enumerate(tls[k]) if t.numel())
    spans.sort()
    active: list[tuple] = []  # spans that reach past the current start
    for span in spans:
        active = [a for a in active if a[1] > span[0]]
        for a in active:
            x, y = tls[a[3]][a[4]], tls[span[3]][span[4]]
            if (a[2] and span[2]) or _share_elements(x, y):
                first, second = sorted([(a[3], a[4]), (span[3], span[4])])
                raise ValueError(f"{names[first[0]]}[{first[1]}] and {names[second[0]]}[{second[1]}] share memory; "
                                 f"this op writes both, so the result would depend on the order of the writes: "
                                 f"pass distinct tensors (clone one of them)")
        active.append(span)


def _strided_span(name: str, i: int, t: Tensor) -> tuple[int, int, bool]:
    """Byte range of a non-empty written tensor that is not contiguous, and whether it is dense;
    raises if two of its elements share a memory location."""
    status = torch._debug_has_internal_overlap(t)  # 0: no overlap, 1: overlap, 2: not decided by PyTorch
    overlaps = status == 1 or (status == 2 and _self_overlaps(t))
    if overlaps is None:
        raise ValueError(f"{name}[{i}] has a strided layout of {t.numel()} elements whose internal overlap is "
                         f"not checked element by element above {_ENUMERATION_LIMIT}; pass "
                         f"{name}[{i}].contiguous() and copy the result back")
    if overlaps:
        raise ValueError(f"{name}[{i}] has internal overlap: more than one of its elements refers to a single "
                         f"memory location (an expand()-ed or as_strided view), so writing it in place is "
                         f"ill-defined; pass a tensor with memory of its own, e.g. {name}[{i}].clone()")
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + extent * t.element_size(), extent == t.numel()


def _self_overlaps(t: Tensor) -> bool | None:
    # Dims by increasing stride: when each stride exceeds the largest offset reachable with the smaller
    # ones, every element has its own offset (the mixed-radix argument). Otherwise count the offsets.
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            if t.numel() > _ENUMERATION_LIMIT:
                return None  # not decided
            return _element_offsets(t).unique().numel() != t.numel()
        reach += (size - 1) * stride
    return False


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors without internal overlap, whose byte ranges overlap, share an element."""
    size = a.element_size()
    delta = a.data_ptr() - b.data_ptr()
    if (size != b.element_size() or delta % size or a.numel() > _ENUMERATION_LIMIT
            or b.numel() > _ENUMERATION_LIMIT):
        return True  # refused as sharing: not decided element by element
    return bool(torch.isin(_element_offsets(a) + delta // size, _element_offsets(b)).any())


def _element_offsets(t: Tensor) -> Tensor:
    """The offset of every element of ``t`` from its first element, in elements (int64, on the host)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    return offsets.reshape(-1)


# --- given selection statistics ------------------------------------------------------------------
def check_given_stats(thresholds: object, nonfinite: object, count: int,
                      device: torch.device) -> tuple[Tensor, Tensor] | None:
    """The ``thresholds``/``nonfinite`` arguments of an op that can skip its selection: both None (returns
    None), or both given as :func:`cure_kernels.rgp_select` returns them -- contiguous 1-D tensors of
    ``count`` elements, float32 and int64, on ``device`` (returned detached)."""
    if thresholds is None and nonfinite is None:
        return None
    if thresholds is None or nonfinite is None:
        missing, present = ("thresholds", "nonfinite") if thresholds is None else ("nonfinite", "thresholds")
        raise ValueError(f"{present} was given without {missing}; pass both, as cure_kernels.rgp_select returns "
                         f"them ((thresholds, nonfinite) = rgp_select(grads_nat, grads_adv, alpha=..., p=...)), "
                         f"or neither")
    out = []
    for name, t, dtype in (("thresholds", thresholds, torch.float32), ("nonfinite", nonfinite, torch.int64)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor (from cure_kernels.rgp_select), got {type(t).__name__}")
        if t.dim() != 1 or t.numel() != count:
            raise ValueError(f"{name} must be a 1-D tensor of {count} elements (one per tensor of the lists), got "
                             f"shape {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}; pass what cure_kernels.rgp_select "
                            f"returns")
        if t.device != device and count:
            raise ValueError(f"{name} is on {t.device} but the tensors are on {device}; compute it on their device")
        if t.layout != torch.strided or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; pass {name}.contiguous()")
        out.append(t.detach())
    return out[0], out[1]
