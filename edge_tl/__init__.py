"""edge-tl: fine-tune a pretrained backbone on a small dataset and take it to an edge device.

Stages: ``edge_tl.finetune`` (torch, timm), ``edge_tl.export`` (ONNX, INT8, TensorRT)
and ``edge_tl.runtime`` (numpy + ONNX Runtime or TensorRT, never torch).
"""

__version__ = "0.1.0"
