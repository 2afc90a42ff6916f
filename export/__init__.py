"""Turn a diffusers model into artifacts the ONNX Runtime and TensorRT backends load.

onnx_export   export each component to ONNX (dynamic batch axis, fp32 and fp16), check it against torch
verify        run an exported graph with ONNX Runtime next to torch and report the max difference
manifest      the JSON beside every export: source hash, exporter versions, opset, shapes, precisions
cache         content-keyed export cache used by `--backend onnxruntime` on a plain diffusers folder
artifacts     read an export folder back as a model description (configs, tokenizers; no torch weights)
tensorrt_plan TensorRT pieces that need no TensorRT: batch-bucket profiles, profile choice, engine cache keys
tensorrt_build  build TensorRT engines from the ONNX (TensorRT 10 Python API, imported lazily)
"""
