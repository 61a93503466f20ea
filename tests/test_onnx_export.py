"""FP32 ONNX export: pixel input with normalization baked in, static graph, parity with PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edge_tl.export.onnx_export import INPUT_NAME, export_onnx
from edge_tl.finetune.data import _decode, _scan_classes
from edge_tl.finetune.train import load_model, predict_logits
from edge_tl.runtime.spec import PreprocessSpec


def test_onnx_graph_is_static_and_checked(elpv_run, tmp_path):
    model, ckpt = load_model(elpv_run / "best.pt")
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    path = export_onnx(model, spec, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Shape", "Gather", "Unsqueeze", "Concat", "Ceil"}, ops  # no shape arithmetic
    assert "Pad" in ops  # TF SAME padding became static pads
    dims = graph.input[0].type.tensor_type.shape.dim
    assert graph.input[0].name == INPUT_NAME and dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 96, 96]


def test_onnx_runtime_matches_pytorch_on_real_images(elpv_run, elpv_small, tmp_path):
    """Torch side: timm's eval transform. ONNX side: the runtime's numpy/Pillow preprocessing."""
    model, ckpt = load_model(elpv_run / "best.pt")
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    path = export_onnx(model, spec, tmp_path / "model.onnx")
    test = _decode(_scan_classes(elpv_small / "test"), ckpt["classes"], spec, [], "", False)
    ref = predict_logits(model, test, spec, torch.device("cpu")).numpy()
    pixels = np.stack([spec.to_pixels(spec.load(p)) for p in test.paths])
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})[0]
    assert got.shape == ref.shape == (24, 4)
    assert np.abs(got - ref).max() < 1e-3
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_reparameterizable_models_run_fused():
    """MobileOne (like FastViT, RepVGG) trains several branches per layer; what export and the torch
    reference load runs them fused, as timm deploys them: the same outputs, 191 -> 43 convolutions."""
    import timm

    from edge_tl.finetune.train import for_inference

    torch.manual_seed(0)
    model = timm.create_model("mobileone_s0", num_classes=3)
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))  # train-mode batch statistics into the BatchNorm layers
        x = torch.randn(2, 3, 64, 64)
        before = model.eval()(x)
        fused = for_inference(model)
        after = fused(x)
    assert float((before - after).abs().max() / before.abs().max()) < 1e-4
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 43 and not [m for m in fused.modules() if isinstance(m, torch.nn.BatchNorm2d)]
