"""`gpt2onnx.ray`: generate over a Ray Dataset (extra ``[ray]``); see `gpt2onnx.integrations.ray`.

>>> from gpt2onnx.ray import Gpt2OnnxPredictor, generate_dataset   # doctest: +SKIP

This module never imports the ``ray`` package itself (Ray imports it on its workers), so
its name does not shadow ``ray`` for any code that uses absolute imports.
"""

from __future__ import annotations

from .integrations.ray import Gpt2OnnxPredictor, generate_dataset

__all__ = ["Gpt2OnnxPredictor", "generate_dataset"]
