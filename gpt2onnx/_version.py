"""The package version (one place; `gpt2onnx.__version__` and the manifests read it)."""

__version__ = "0.1.0"
