"""INT8 by static post-training quantization to explicit Q/DQ ONNX.

Two INT8 flavours, different files for good reason (measured on a 2-core AVX-512-VNNI EPYC):

- ``tensorrt``: symmetric int8 activations and per-channel int8 weights, float biases: the
  explicit quantization TensorRT 10 and 11 expect (zero points must be 0). Q/DQ sit on the
  *inputs* of Conv/Gemm/MatMul only, as NVIDIA's placement guide recommends: quantizing a
  Conv's output quantizes its pre-activation range (ReLU6 then uses a fraction of the int8
  steps), which on ELPV/Lite0 made the logit error 5x larger (FP32 agreement 90 % instead of
  98 %); residual Adds compute in float (their skip input is the next Conv's Q/DQ'd tensor). On ONNX Runtime CPU this
  runs *slower* than FP32, so it is not the CPU choice.
- ``cpu``: uint8 activations (asymmetric) with per-channel int8 weights, the layout ONNX
  Runtime's VNNI kernels are fastest on.

Calibration uses images from the *training* split with the eval preprocessing; the same images
then correct each quantized layer's bias for the mean shift its int8 weights add (:func:`correct_biases`). When INT8
loses more than ``max_drop`` points of validation accuracy, the layers that hurt most are
kept in float, doubling their number until the drop fits (OpenVINO's accuracy-aware idea).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edge_tl.errors import UserError
from edge_tl.fileio import atomic_write
from edge_tl.runtime.check import NOISE_MIN_IMAGES, accuracy, drop_noise, noise_allowance
from edge_tl.runtime.bench import int8_speed
from edge_tl.runtime.cpu import cpu_info
from edge_tl.runtime.images import cpu_cores, to_input
from edge_tl.runtime.runners import OnnxRuntimeRunner

CALIB_METHODS = ("minmax", "entropy", "percentile")
BIAS_CORRECTION_ROUNDS = 1  # see correct_biases; chosen on held-out images, benchmarks/README.md
# ELPV, Lite0, 4 classes, agreement with FP32 on 1458 validation + held-out training images
# (benchmarks/int8_tensorrt_explore.py): TensorRT flavour 98.4 % minmax (512 images), 98.4 %
# entropy, 98.3 % percentile (80 images: ONNX Runtime's histograms hold every activation).


@dataclass(frozen=True)
class Flavour:
    """How one INT8 flavour is quantized, and why."""

    artifact: str  # its name in a bundle
    backend: str  # what runs it: the bundle artifact's "backend"
    activation_signed: bool
    symmetric_activations: bool
    quantize_bias: bool
    op_types: tuple[str, ...] | None
    why: str
    quant_format: str = "qdq"  # qdq (explicit Q/DQ pairs) or qoperator (QLinearConv & co.)
    per_channel: bool = True
    float_op_types: tuple[str, ...] = ()  # op types never quantized (their nodes are excluded)
    quantize_outputs: bool = True  # False: Q/DQ on the inputs of quantized ops only (TensorRT's placement)
    calib_method: str = "minmax"  # what --calib-method auto picks


FLAVOURS = {
    "tensorrt": Flavour("int8", "tensorrt", True, True, False, ("Conv", "Gemm", "MatMul"),
                        "TensorRT explicit quantization: symmetric int8 Q/DQ on Conv/Gemm/MatMul inputs, "
                        "per-channel weights, float bias", quantize_outputs=False),
    "cpu": Flavour("int8-cpu", "onnxruntime", False, False, True, None,
                   "ONNX Runtime CPU: u8 activations / s8 per-channel weights, fastest on VNNI"),
}


def batches(pixels: np.ndarray, size: int = 32):
    """uint8 N×H×W×3 -> float32 N×3×H×W chunks (the ONNX graph's pixel input)."""
    for i in range(0, len(pixels), size):
        yield to_input(pixels[i:i + size])


def onnx_logits(path: str | Path, pixels: np.ndarray, threads: int = 0) -> np.ndarray:
    """Logits of an ONNX file on ONNX Runtime CPU for uint8 N×H×W×3 pixels."""
    with OnnxRuntimeRunner(path, "cpu", threads) as runner:
        return np.concatenate([runner.infer(x) for x in batches(pixels)])


def prepare(fp32_path: Path, out_path: Path) -> Path:
    """Shape inference + ONNX Runtime's pre-quantization optimizations, every node named."""
    from onnxruntime.quantization import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    model = onnx.load(str(out_path))
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    onnx.save(model, str(out_path))
    return out_path


def quantize_int8(prepared: Path, out_path: Path, calib_pixels: np.ndarray, flavour: str | Flavour = "cpu",
                  method: str = "minmax", exclude: tuple[str, ...] = (),
                  bias_correction: int = BIAS_CORRECTION_ROUNDS) -> Path:
    """Static quantization of ``prepared`` (see :func:`prepare`) per ``flavour``, its biases corrected on the
    calibration images (:func:`correct_biases`, ``bias_correction`` rounds; 0: not), written atomically."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if method not in CALIB_METHODS:
        raise UserError(f"--calib-method {method}: use one of {', '.join(CALIB_METHODS)}.")
    fl = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    if method != "minmax":
        calib_pixels = calib_pixels[:histogram_image_limit(prepared)]
    graph = onnx.load(str(prepared), load_external_data=False).graph
    name = graph.input[0].name
    exclude = tuple(exclude) + tuple(n.name for n in graph.node if n.op_type in fl.float_op_types)

    class Reader(CalibrationDataReader):
        def __init__(self):
            # histogram methods: batch 1, as ONNX Runtime stacks their activations (equal shapes needed)
            self.it = iter(batches(calib_pixels, 16 if method == "minmax" else 1))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    options = {"ActivationSymmetric": fl.symmetric_activations, "WeightSymmetric": True,
               "QuantizeBias": fl.quantize_bias}
    if not fl.quantize_outputs:
        options["OpTypesToExcludeOutputQuantization"] = list(fl.op_types or ())
    # no CalibMaxIntermediateOutputs: MinMax keeps only per-batch minima/maxima anyway, and in
    # ONNX Runtime 1.32 that option discards the batches collected before each flush.
    if method == "percentile":
        options["CalibPercentile"] = 99.999

    def write(tmp: Path) -> None:
        with _quiet_axis_warnings():
            quantize_static(str(prepared), str(tmp), Reader(),
                            quant_format=QuantFormat.QOperator if fl.quant_format == "qoperator" else QuantFormat.QDQ,
                            op_types_to_quantize=list(fl.op_types) if fl.op_types else None, per_channel=fl.per_channel,
                            activation_type=QuantType.QInt8 if fl.activation_signed else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                              "percentile": CalibrationMethod.Percentile}[method],
                            extra_options=options)
        drop_unused_opsets(tmp)
        if bias_correction:
            correct_biases(prepared, tmp, calib_pixels, bias_correction)

    return atomic_write(out_path, write)


@contextlib.contextmanager
def _quiet_axis_warnings():
    """Drop ONNX Runtime's quantizer warning "Axis 1 is out-of-range for weight ..." (logged on the root
    logger once per 1-D weight, e.g. a LayerNorm's, per quantization try: 133 lines for MobileViT):
    such a weight is quantized per tensor, which is right for it."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def drop_unused_opsets(path: Path) -> None:
    """Remove opset imports no node uses. ONNX Runtime's quantizer stamps every domain its
    session knows (ai.onnx.ml v5, com.microsoft, ...), and older runtimes refuse a model that
    imports a domain version they lack (1.17: "ai.onnx.ml is till opset 4"), even unused."""
    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | {""}
    for f in model.functions:
        used |= {n.domain for n in f.node} | {f.domain}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    if len(keep) < len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(path))


HISTOGRAM_MEMORY_BYTES = 4 << 30


def activation_bytes_per_image(model_path: Path) -> int:
    """Bytes of every float activation of one image (from ONNX shape inference)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    total = 0
    for v in model.graph.value_info:
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim][1:]
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and dims and all(dims):
            total += 4 * int(np.prod(dims))
    return max(total, 1)


def histogram_image_limit(model_path: Path) -> int:
    """Entropy and percentile calibration in ONNX Runtime keep every activation of every
    calibration image in memory until the end; cap the images so that stays near 4 GB."""
    return max(16, HISTOGRAM_MEMORY_BYTES // activation_bytes_per_image(model_path))


def quantized_nodes(int8_model: onnx.ModelProto, op_types: tuple[str, ...] | None = None) -> list[onnx.NodeProto]:
    """Compute nodes that read a DequantizeLinear output (i.e. run in int8), of ``op_types`` if given
    (a float Add that shares a quantized skip input is not one to keep in float)."""
    dq_out = {o for n in int8_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n for n in int8_model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input)
            and (op_types is None or n.op_type in op_types)]


def _probe_session(model: onnx.ModelProto, fetch: list[str], optimize: bool = False):
    """An ONNX Runtime CPU session of ``model`` that also outputs the tensors ``fetch``, graph rewrites
    off unless ``optimize``: a Q/DQ pair fused into an int8 kernel would hide the float tensors around it."""
    import onnxruntime as ort

    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in fetch if n not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def layer_damage(prepared: Path, int8_path: Path, pixels: np.ndarray,
                 op_types: tuple[str, ...] | None = None) -> list[tuple[str, float]]:
    """Quantized nodes ranked by the error each one adds, worst first.

    Both models expose every quantized node's float input and output; a node's damage is
    the relative squared error of its output minus that of its input (both INT8 model vs
    FP32), so a node is blamed for the error it creates, not what it inherits.
    """
    int8 = onnx.load(str(int8_path))
    nodes = quantized_nodes(int8, op_types)
    fp32 = onnx.load(str(prepared))
    fp32_names = {o for n in fp32.graph.node for o in n.output} | {i.name for i in fp32.graph.input}
    q_in = {n.output[0]: n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    float_source = {n.output[0]: q_in.get(n.input[0], n.input[0])  # a Q→DQ pair's output -> its float input
                    for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    pairs = []
    for n in nodes:
        ins = [float_source.get(i, i) for i in n.input]
        ins = [i for i in ins if i in fp32_names]
        out = n.output[0].removesuffix("_QuantizeLinear_Input")  # a quantized graph output is renamed so
        if out in fp32_names and ins:
            pairs.append((n.name, ins, out))
    names = sorted({t for _, ins, out in pairs for t in (*ins, out)})
    int8_names = {o for n in int8.graph.node for o in n.output}
    runs = {}
    for key, path in (("fp32", prepared), ("int8", int8_path)):
        # in the int8 graph a quantized graph output's float value is "<name>_QuantizeLinear_Input"
        fetch = [f"{t}_QuantizeLinear_Input" if key == "int8" and f"{t}_QuantizeLinear_Input" in int8_names else t
                 for t in names]
        sess = _probe_session(onnx.load(str(path)), fetch)
        inp = sess.get_inputs()[0].name
        outs = [sess.run(fetch, {inp: x}) for x in batches(pixels, 8)]
        runs[key] = {n: np.concatenate([o[k] for o in outs]).astype(np.float64) for k, n in enumerate(names)}

    def rel_err(t: str) -> float:
        f, q = runs["fp32"][t], runs["int8"][t]
        return float(((q - f) ** 2).sum() / max((f ** 2).sum(), 1e-12))

    scores = sorted(((name, rel_err(out) - max(rel_err(i) for i in ins)) for name, ins, out in pairs),
                    key=lambda s: -s[1])
    ranked = {name for name, _ in scores}
    return scores + [(n.name, float("nan")) for n in nodes if n.name not in ranked]  # unmatched ones last


def correct_biases(prepared: Path, int8_path: Path, pixels: np.ndarray, rounds: int = BIAS_CORRECTION_ROUNDS) -> dict:
    """Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", sec. 4.2; on by default in
    NNCF, OpenVINO's quantizer): int8 weights shift the mean of a layer's output wherever its inputs have
    a mean (ReLU6 outputs do), E[(W_q - W) x] != 0, and the shifts add up down the network.

    Each quantized Conv and Gemm with a bias gets a twin in a probe graph, the same op on the same int8
    input with the FP32 weights and bias; the per-channel mean of twin minus layer over ``pixels`` is
    added to the layer's bias (in units of its scale where the bias is int32, the CPU flavour; as is
    where it is float, the TensorRT flavour). A layer is measured against its twin, not against the FP32
    model's tensor, so it is corrected for the shift it adds and not again for the one it inherits:
    correcting every layer at once by its whole difference from FP32 overcorrects down the network
    (it diverged on a small model). ``rounds`` repeats it on the corrected inputs. Layers are matched to
    the FP32 graph by node name (:func:`prepare` names every node; the quantizer keeps the names).
    Edits ``int8_path`` in place; returns the layer count and the mean absolute channel shift before
    each round and after the last.
    """
    int8, fp32 = onnx.load(str(int8_path)), onnx.load(str(prepared))
    inits = {t.name: t for t in int8.graph.initializer}
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    producer = {o: n for n in int8.graph.node for o in n.output}
    uses = {}
    for n in int8.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    opset = next(o.version for o in int8.opset_import if o.domain in ("", "ai.onnx"))
    layers, probe_nodes, probe_inits = [], [], []  # (its shift tensor, bias initializer, int32 scale or None, beta)
    for n in quantized_nodes(int8, ("Conv", "Gemm")):
        src = fp32_nodes.get(n.name)
        if len(n.input) < 3 or not n.input[2] or src is None or not all(i in fp32_inits for i in src.input[1:3]):
            continue
        bias, scale = n.input[2], None
        dq = producer.get(bias)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            bias, scale = dq.input[0], dq.input[1]
        if bias not in inits or uses.get(bias) != 1 or (scale is not None and scale not in inits):
            continue
        twin = f"{n.name}/fp32_twin"
        probe_inits += [onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(fp32_inits[i]), f"{twin}/{k}")
                        for i, k in zip(src.input[1:3], ("weight", "bias"))]
        node = onnx.helper.make_node(n.op_type, [n.input[0], f"{twin}/weight", f"{twin}/bias"], [twin], name=twin)
        node.attribute.extend(src.attribute)  # the FP32 layer's own (ONNX Runtime's quantizer sets a Gemm's beta to 1)
        # the shift, reduced in the graph to one value per channel: every axis but 1 (Conv's weight rank = its output's)
        axes = [0] + list(range(2, len(fp32_inits[src.input[1]].dims) if n.op_type == "Conv" else 2))
        reduce = (onnx.helper.make_node("ReduceMean", [f"{twin}/diff"], [f"{twin}/shift"], keepdims=0, axes=axes)
                  if opset < 18 else
                  onnx.helper.make_node("ReduceMean", [f"{twin}/diff", f"{twin}/axes"], [f"{twin}/shift"], keepdims=0))
        if opset >= 18:
            probe_inits.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), f"{twin}/axes"))
        probe_nodes += [node, onnx.helper.make_node("Sub", [twin, n.output[0]], [f"{twin}/diff"]), reduce]
        beta = next((a.f for a in n.attribute if a.name == "beta"), 1.0)  # Gemm: the bias enters its output x beta
        layers.append((f"{twin}/shift", bias, scale, beta))
    shifts = []
    for round_ in range(rounds + 1) if layers else ():
        probe = onnx.ModelProto()
        probe.CopyFrom(int8)
        probe.graph.node.extend(probe_nodes)
        probe.graph.initializer.extend(probe_inits)
        deltas = _batch_means(probe, [layer[0] for layer in layers], pixels)
        shifts.append(float(np.mean([np.abs(d).mean() for d in deltas])))
        if round_ == rounds:
            break
        for (_, bias, scale, beta), delta in zip(layers, deltas):
            delta = delta / beta
            value = onnx.numpy_helper.to_array(inits[bias])
            if scale is None:
                value = (value + delta).astype(value.dtype)
            else:
                step = onnx.numpy_helper.to_array(inits[scale]).astype(np.float64)
                value = np.clip(value + np.round(delta / step), -2 ** 31, 2 ** 31 - 1).astype(value.dtype)
            inits[bias].CopyFrom(onnx.numpy_helper.from_array(value, bias))
    onnx.save(int8, str(int8_path))
    return {"layers": len(layers), "mean_abs_shift": shifts}


def _batch_means(model: onnx.ModelProto, names: list[str], pixels: np.ndarray) -> list[np.ndarray]:
    """Each tensor ``names`` of ``model`` (a per-batch mean) averaged over ``pixels``' batches, by batch size.
    Only these small tensors come out, so ONNX Runtime may optimize the graph around them (0.75x the time)."""
    sess = _probe_session(model, names, optimize=True)
    inp = sess.get_inputs()[0].name
    sums = [0.0] * len(names)
    for x in batches(pixels, 8):
        sums = [total + len(x) * out.astype(np.float64) for total, out in zip(sums, sess.run(names, {inp: x}))]
    return [total / len(pixels) for total in sums]


def quantize_within_budget(fp32_path: Path, out_path: Path, calib_pixels: np.ndarray, val_pixels: np.ndarray,
                           val_labels: np.ndarray, fp32_logits: np.ndarray, flavour: str, method: str,
                           max_drop: float, bias_correction: int = BIAS_CORRECTION_ROUNDS, log=print) -> dict:
    """INT8 ``flavour`` of ``fp32_path``; layers kept in float until the val drop is within ``max_drop``
    points plus an allowance for its sampling noise.

    The noise is the standard error of a paired accuracy difference on these images,
    sqrt(images only FP32 gets right + images only INT8 gets right) / images: on 296 validation
    images where INT8 and FP32 disagree on 7, a drop of 3 images (1.01 pts) is 1.1 standard errors,
    and chasing it kept 32 layers in float and made INT8 slower than FP32 (an ELPV `make demo`,
    session 17). The allowance is that noise, capped at ``max_drop`` (so never more than twice the
    budget, and none for ``max_drop`` 0), and only from ``NOISE_MIN_IMAGES`` validation images up:
    the noise is measured on the same images as the drop, so on a few images one lost image is
    always "within noise", however broken the INT8. A try with layers in float is taken only where it
    is closer to FP32 than the fully quantized model beyond noise (``improved_beyond_noise``); the try
    with every layer in float is FP32 itself. ``fp32_logits`` are the FP32 model's on
    ``val_pixels``; ``bias_correction``: rounds of :func:`correct_biases` on each try. Returns the record for the manifest: accuracy, drop, its noise and allowance,
    top-1 agreement with FP32, float-kept nodes, every try.
    """
    fp32_accuracy = accuracy(fp32_logits, val_labels)
    with tempfile.TemporaryDirectory(prefix="edge-tl-quant-") as tmp:
        prepared = prepare(fp32_path, Path(tmp) / "prepared.onnx")
        fully_quantized = Path(tmp) / "fully_quantized.onnx"
        tries, exclude, ranking = [], (), None
        while True:
            quantize_int8(prepared, out_path, calib_pixels, flavour, method, exclude, bias_correction)
            if not exclude:
                shutil.copyfile(out_path, fully_quantized)
            logits = onnx_logits(out_path, val_pixels)
            acc = accuracy(logits, val_labels)
            drop = round((fp32_accuracy - acc) * 100, 3)
            noise = round(drop_noise(fp32_logits, logits, val_labels), 3)
            agree = float((logits.argmax(1) == fp32_logits.argmax(1)).mean())
            tries.append({"float_nodes": len(exclude), "val_accuracy": acc, "drop_pts": drop, "noise_pts": noise,
                          "fp32_agreement": agree})
            spread = (f"± {noise:.2f}" if len(val_labels) >= NOISE_MIN_IMAGES else  # a few images: no noise estimate
                      f"(its noise not measurable on {len(val_labels)} images: one is {100 / len(val_labels):.1f})")
            log(f"  int8 ({flavour}) with {len(exclude)} layers in float: val accuracy {acc:.4f}, drop {drop:+.2f} "
                f"{spread} pts, top-1 agreement with fp32 {agree:.4f}")
            allowance = noise_allowance(noise, max_drop, len(val_labels))
            tries[-1]["noise_allowance_pts"] = allowance
            if not exclude:
                fully_logits = logits
            else:
                tries[-1]["beyond_noise"] = improved_beyond_noise(fully_logits, logits, fp32_logits)
            if drop <= max_drop + allowance:
                if tries[-1].get("beyond_noise", True):
                    break
                log("    within the budget, but no closer to fp32 than fully quantized beyond noise: not taken")
            if ranking is None:
                ranking = [name for name, _ in layer_damage(prepared, out_path, val_pixels[:32],
                                                            FLAVOURS[flavour].op_types)]
            if len(exclude) >= len(ranking):
                break
            exclude = tuple(ranking[:max(1, 2 * len(exclude))])
        within = tries[-1]["drop_pts"] <= max_drop + tries[-1]["noise_allowance_pts"]
        if ranking is not None and len(exclude) >= len(ranking):  # every layer in float: an FP32 model, not INT8
            shutil.copyfile(fully_quantized, out_path)
            kept, exclude = tries[0], ()
            rejected = _not_reached(kept, tries[-1], len(val_labels), max_drop, within)
        else:
            kept, rejected = tries[-1], None
    return {"flavour": flavour, "why": FLAVOURS[flavour].why, "calib_method": method, "float_nodes": list(exclude),
            "val_accuracy": kept["val_accuracy"], "drop_pts": kept["drop_pts"], "noise_pts": kept["noise_pts"],
            "noise_allowance_pts": kept["noise_allowance_pts"], "max_drop": max_drop,
            "fp32_agreement": kept["fp32_agreement"], "accepted": rejected is None,
            **({"rejected": rejected} if rejected else {}), "tries": tries}


def improved_beyond_noise(fully_logits: np.ndarray, logits: np.ndarray, fp32_logits: np.ndarray) -> bool:
    """Whether a try with layers in float is closer to FP32 than the fully quantized model beyond
    noise: it agrees with FP32's top-1 on more images, by more than the square root of the images
    where exactly one of the two agrees (from ``NOISE_MIN_IMAGES`` images; below, any gain counts).
    Float layers that repair quantization damage bring the model back towards FP32; each try is also
    another draw of the noisy validation drop, and without this the fallback stopped at whichever try
    noise favoured (session 22's `make demo`: 32 layers in float won 5 images against the labels, but
    agreed with FP32 on 288 of 296 instead of 286 — the two INT8 models differed on 10 images — and ran
    no faster than FP32; fully quantized, it lost 0.31 pts on test)."""
    reference = fp32_logits.argmax(1)
    agree_fully, agree = fully_logits.argmax(1) == reference, logits.argmax(1) == reference
    gain = int(agree.sum()) - int(agree_fully.sum())
    return gain > 0 and (len(reference) < NOISE_MIN_IMAGES or gain > math.sqrt(int((agree != agree_fully).sum())))


def _not_reached(fully: dict, all_float: dict, images: int, max_drop: float, all_float_within: bool) -> str:
    """Why no INT8 model meets the budget (``fully``: the try with no layer in float, ``all_float``:
    with every one), and what to do, for the log and the manifest."""
    lost = round(fully["drop_pts"] * images / 100)
    why = (f"fully quantized it loses {fully['drop_pts']:.2f} pts ({lost} of {images} validation images) and meets "
           f"--max-drop {max_drop:g} only with every layer in float (an FP32 model, not INT8)" if all_float_within else
           f"it stays {all_float['drop_pts']:.2f} pts below FP32 even with every layer in float")
    if images < NOISE_MIN_IMAGES:
        fix = (f"with {images} validation images one image is {100 / images:.1f} pts, too coarse to measure a "
               f"{max_drop:g}-pt budget: add validation images (DIR/val/<class>/; {NOISE_MIN_IMAGES} or more let the "
               "budget allow for sampling noise), or accept this drop with --max-drop "
               f"{math.ceil(fully['drop_pts'])}")
    else:
        fix = ("try --calib-method percentile or entropy, more --calib-images, or accept the drop with --max-drop "
               f"{math.ceil(fully['drop_pts'])}")
    return f"{why}; the fully quantized model is kept, marked not accepted: {fix}"


def batch1_latency(fp32_path: Path, int8_path: Path, pixels: np.ndarray) -> dict:
    """Batch-1 latency (ms) of the FP32 and INT8 files on ONNX Runtime CPU here, and INT8's ratio to
    FP32 (``int8_speed``), with the CPU that measured it. Some models' INT8 is slower than their FP32
    (attention and hard-swish blocks leave float islands with Q/DQ around them), and whether INT8
    pays off depends on the CPU (VNNI, Arm's dot product): ``edge-tl bench`` measures it again on the device."""
    with OnnxRuntimeRunner(fp32_path, "cpu") as fp32, OnnxRuntimeRunner(int8_path, "cpu") as int8:
        speed = int8_speed(fp32, int8, pixels)
    return {**speed, "runtime": "onnxruntime cpu, the exporting machine", **cpu_info(), "cpu_threads": cpu_cores()}


def slower_than_fp32(speed: dict) -> str:
    """Why an INT8 no faster than FP32 is not the default (it stays accepted and checked), and the fix."""
    timed = (f"{speed['int8_ms']:.2f} vs {speed['fp32_ms']:.2f} ms at batch 1, ONNX Runtime CPU, paired ratio "
             f"{speed['ratio']:.2f}x")
    why = (f"no faster than fp32 on this machine ({timed})" if speed["ratio"] >= 1 and speed["int8_ms"] >= speed["fp32_ms"]
           else f"not shown faster than fp32 on this machine ({timed}: the timings disagree; a busy host?)")
    return (f"not the default: {why}; on the device, `edge-tl bench BUNDLE --batch 1` times both, and --precision int8 "
            "uses it if it is faster there")
