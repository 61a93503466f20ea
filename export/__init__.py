"""edge_tl.export: ONNX, INT8 Q/DQ, TensorRT engines and the bundle (stage 2)."""
