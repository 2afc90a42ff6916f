"""Artifacts the runtime reads: ONNX export folders (manifest.py, exported.py) and TensorRT engine folders
(engines.py). export/ writes them; this package only reads them, and names what it needs from a builder
(builder.py) for "build on first use"."""
