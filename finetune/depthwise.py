"""Faster CPU training of depthwise convolutions: each backward shape timed once, fastest exact formulation kept.

Why: in a bf16 channels_last training step of EfficientNet-Lite0 on this workplace's CPU, the
depthwise convolutions took 51-54 % of the time (``benchmarks/train_profile.py``), mostly in
oneDNN's backward: in probes of single layers the input gradient of a stride-2 depthwise conv
ran 10-35x slower than its forward, the weight gradient of a 5x5 one 3-5x slower than in float32. Both gradients have exact
equivalents built from better-tuned calls:

* input gradient = a stride-1 depthwise *forward* convolution of the output gradient (zeros
  inserted between its pixels for stride > 1) with the kernel flipped;
* weight gradient = the same backward call on float32 copies of the activation and its gradient
  (more memory for that call; only used where it is faster).

Which is fastest depends on the CPU, the shape and the dtype, so, like ``cudnn.benchmark``, every
depthwise shape a training will meet is timed before its first step (``plan_training``) and the
native kernel is replaced only where an alternative is clearly faster (``MARGIN``). The results
agree with the native ones to rounding (bf16 sums in another order, or float32 ones). As with
``cudnn.benchmark``, two runs of one seed that time different plans drift apart over the epochs
like nearby seeds (about 1 pt on ELPV), so a checkpoint keeps its plans and ``--resume`` replays
them, and ``--no-tune-depthwise`` gives bit-reproducible runs. Evaluation and export are untouched: without autograd the modules
call ``F.conv2d``.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same

MARGIN = 1.3  # an alternative must be this much faster than the native backward to be used
_plans: dict[str, tuple[str, str]] = {}  # shape key -> (input-gradient method, weight-gradient method)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


def _native(g, x, w, stride, padding, mask):
    return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, (1, 1), False, (0, 0),
                                               w.shape[0], mask)


def _input_grad_native(g, x, w, stride, padding):
    return _native(g, x, w, stride, padding, (True, False, False))[0]


def _input_grad_flipped(g, x, w, stride, padding):
    """Input gradient as a stride-1 depthwise forward conv of the zero-inserted gradient with the flipped kernel."""
    n, c, h, wd = x.shape
    (sh, sw), (ph, pw), (kh, kw) = stride, padding, w.shape[-2:]
    if (sh, sw) != (1, 1):  # zeros between the pixels, plus the rows/columns the stride skipped at the end
        rows = h - (g.shape[2] - 1) * sh - kh + 2 * ph
        cols = wd - (g.shape[3] - 1) * sw - kw + 2 * pw
        up = torch.empty((n, c, (g.shape[2] - 1) * sh + 1 + rows, (g.shape[3] - 1) * sw + 1 + cols),
                         dtype=g.dtype, device=g.device, memory_format=_memory_format(x)).zero_()
        up[:, :, : up.shape[2] - rows : sh, : up.shape[3] - cols : sw] = g
        g = up
    return F.conv2d(g, w.flip(-2, -1), None, 1, (kh - 1 - ph, kw - 1 - pw), 1, c)


def _weight_grad_native(g, x, w, stride, padding):
    return _native(g, x, w, stride, padding, (False, True, False))[1]


def _weight_grad_float32(g, x, w, stride, padding):
    """Weight gradient computed in float32 (oneDNN's bf16 one is slow for 5x5 kernels here)."""
    return _native(g.float(), x.float(), w.float(), stride, padding, (False, True, False))[1].to(w.dtype)


INPUT_GRAD = {"native": _input_grad_native, "flipped": _input_grad_flipped}
WEIGHT_GRAD = {"native": _weight_grad_native, "float32": _weight_grad_float32}


def _fastest(methods: dict, args: tuple) -> str:
    """The method to use: 'native' unless another is MARGIN times faster (best of 2 timed calls after a warm-up)."""
    if len(methods) == 1:
        return next(iter(methods))
    times = {}
    for name, fn in methods.items():
        fn(*args)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    name = min(times, key=times.get)
    return name if times[name] * MARGIN < times["native"] else "native"


def plan_for(g, x, w, stride, padding) -> tuple[str, str]:
    """(input-gradient, weight-gradient) method for this shape, timed on first use; the batch size is not part of the key."""
    key = (f"{tuple(x.shape[1:])} {tuple(w.shape)} s{tuple(stride)} p{tuple(padding)} {x.dtype} "
           f"{_memory_format(x)} {x.device.type}")
    if key not in _plans:
        args = (g, x, w, stride, padding)
        weight = {k: v for k, v in WEIGHT_GRAD.items() if k == "native" or x.dtype != torch.float32}
        _plans[key] = (_fastest(INPUT_GRAD, args), _fastest(weight, args))
    return _plans[key]


def saved_plans() -> dict[str, list[str]]:
    """The plans timed so far in this process, for a checkpoint: a resumed run replays them."""
    return {k: list(v) for k, v in _plans.items()}


def clear_plans() -> None:
    """Forget every plan, so the next backward of each shape times it again (benchmarks)."""
    _plans.clear()


def load_plans(plans: dict[str, list[str]]) -> None:
    """Use ``saved_plans()`` from a checkpoint (unknown method names, e.g. from another version, are ignored)."""
    for key, (input_method, weight_method) in plans.items():
        if input_method in INPUT_GRAD and weight_method in WEIGHT_GRAD:
            _plans[key] = (input_method, weight_method)


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding):
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, w, b, stride, padding, 1, w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous(memory_format=_memory_format(x))
        args = (g, x, w, ctx.stride, ctx.padding)
        input_method, weight_method = plan_for(*args)
        gx = INPUT_GRAD[input_method](*args) if ctx.needs_input_grad[0] else None
        gw = WEIGHT_GRAD[weight_method](*args) if ctx.needs_input_grad[1] else None
        gb = g.sum((0, 2, 3), dtype=torch.float32).to(g.dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


class TunedDepthwiseConv2d(torch.nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (zero padding, no dilation) whose training backward uses the tuned plan."""

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return x, tuple(self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._pad(x)
        w, b = self.weight, self.bias
        if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return F.conv2d(x, w, b, self.stride, padding, 1, self.groups)
        if torch.is_autocast_enabled(x.device.type):  # cast as autocast would, so backward sees the conv's inputs
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _DepthwiseConv.apply(x, w, b, tuple(self.stride), padding)


class TunedDepthwiseConv2dSame(TunedDepthwiseConv2d):
    """The same for timm's ``Conv2dSame`` (TensorFlow 'SAME' padding computed from each input's size)."""

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return pad_same(x, self.kernel_size, self.stride, self.dilation), (0, 0)


def _eligible(m: torch.nn.Module) -> bool:
    return (type(m) in (torch.nn.Conv2d, Conv2dSame) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
            and m.dilation == (1, 1) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and all(p <= k - 1 for p, k in zip(m.padding, m.kernel_size)))


def tune_depthwise(model: torch.nn.Module) -> int:
    """Switch ``model``'s depthwise convolutions to the tuned backward, in place; returns how many.

    Parameters and state_dict keys are unchanged; ``untune_depthwise`` switches them back."""
    count = 0
    for m in model.modules():
        if _eligible(m):
            m.__class__ = TunedDepthwiseConv2dSame if type(m) is Conv2dSame else TunedDepthwiseConv2d
            count += 1
    return count


def untune_depthwise(model: torch.nn.Module) -> None:
    """Undo ``tune_depthwise``."""
    for m in model.modules():
        if isinstance(m, TunedDepthwiseConv2d):
            m.__class__ = Conv2dSame if type(m) is TunedDepthwiseConv2dSame else torch.nn.Conv2d


def plan_training(model: torch.nn.Module, batch_shapes: Iterable[tuple[int, ...]], dtype: torch.dtype | None,
                  layout: torch.memory_format = torch.channels_last) -> None:
    """Time every depthwise shape a training will meet before its first step, so no result depends
    on when a shape first came up (and the first checkpoint already holds every plan).

    One forward and backward per batch shape on zeros; BatchNorm statistics and the random
    state stay untouched, gradients are cleared. Shapes with a plan (e.g. loaded from a
    resumed checkpoint) keep it."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            for shape in batch_shapes:
                x = torch.zeros(shape, device=device).contiguous(memory_format=layout)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    out = model(x)
                out.float().sum().backward()
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
