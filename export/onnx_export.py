"""FP32 ONNX export of a fine-tuned run, normalization baked in, graph clean for TensorRT.

The graph's input is float32 RGB pixels 0–255, N×3×H×W at the spec's size: apps resize and
crop (the spec says how) but never re-implement mean/std, the commonest cause of accuracy
lost on devices. TF "SAME" padding (timm's ``Conv2dSame``) is computed from the input shape
at run time; at a fixed input size it is replaced by a static ``Pad`` so the graph has no
shape-computation subgraphs.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from timm.layers import Conv2dSame

from edge_tl.fileio import atomic_write
from edge_tl.runtime.spec import PreprocessSpec

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


class PixelInput(torch.nn.Module):
    """Wraps a model so it takes 0–255 RGB pixels: ``model(x * scale + bias)``."""

    def __init__(self, model: torch.nn.Module, spec: PreprocessSpec):
        super().__init__()
        self.model = model
        mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
        self.register_buffer("scale", torch.from_numpy(1.0 / (255.0 * std)).view(1, 3, 1, 1))
        self.register_buffer("bias", torch.from_numpy(-mean / std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels * self.scale + self.bias)


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    pad = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return pad // 2, pad - pad // 2


def static_same_padding(model: torch.nn.Module, input_size: tuple[int, int]) -> int:
    """Replace every ``Conv2dSame`` by ``ZeroPad2d`` + ``Conv2d`` for ``input_size``; return the count."""
    sizes: dict[str, tuple[int, int]] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv2dSame)}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: sizes.__setitem__(n, tuple(args[0].shape[-2:])))
             for n, m in convs.items()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, *input_size))
    for h in hooks:
        h.remove()
    for name, conv in convs.items():
        (ih, iw), (kh, kw), (sh, sw), (dh, dw) = sizes[name], conv.kernel_size, conv.stride, conv.dilation
        top, bottom = _same_pads(ih, kh, sh, dh)
        left, right = _same_pads(iw, kw, sw, dw)
        plain = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                conv.dilation, conv.groups, conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, torch.nn.Sequential(torch.nn.ZeroPad2d((left, right, top, bottom)), plain))
    return len(convs)


def fold_pad_inputs(model, input_shape: tuple[int, ...]):
    """Replace each ``Pad``'s computed ``pads`` input by a constant and drop the dead subgraph.

    The TorchScript exporter builds ``pads`` from ConstantOfShape/Concat/Slice even when they
    are static; TensorRT and graph checkers want plain constants.
    """
    import onnx
    import onnxruntime as ort

    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    names = sorted({n.input[1] for n in pads} - {i.name for i in model.graph.initializer})
    if not names:
        return model
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = sess.run(names, {model.graph.input[0].name: np.zeros(input_shape, np.float32)})
    for name, value in zip(names, values):
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.int64), f"{name}_folded"))
        for n in pads:
            if n.input[1] == name:
                n.input[1] = f"{name}_folded"
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):  # nodes are topologically sorted
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    used = {i for n in model.graph.node for i in n.input}
    live = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    return model


def export_onnx(model: torch.nn.Module, spec: PreprocessSpec, path: str | Path, opset: int = 17) -> Path:
    """Write ``model`` as ONNX (dynamic batch, pixel input), check it with ``onnx.checker``."""
    import onnx

    model = PixelInput(copy.deepcopy(model).eval(), spec).eval()
    static_same_padding(model.model, spec.input_size)
    dummy = torch.zeros(1, 3, *spec.input_size) + 128.0

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        graph = fold_pad_inputs(onnx.load(str(tmp)), (1, 3, *spec.input_size))
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(tmp))

    return atomic_write(path, write)


def to_fp16(fp32_path: str | Path, path: str | Path) -> Path:
    """FP16 weights and compute, float32 input/output kept: what strongly typed TensorRT (11)
    builds an FP16 engine from, and what ONNX Runtime's CUDA provider runs in half precision."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    topological_sort(model.graph)

    def write(tmp: Path) -> None:
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))

    return atomic_write(path, write)


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after its inputs' producers (in place)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an undefined input")
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)
