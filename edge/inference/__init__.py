"""Inference: from an image to a result, the same way for every ingest source.

:mod:`~edge.inference.manifest` describes a bundled model (artifacts,
checksums, pre- and post-processing); :mod:`~edge.inference.preprocess` and
:mod:`~edge.inference.postprocess` turn a source image into the model's input
and its outputs into masks and boxes (the trainer uses the same code);
:mod:`~edge.inference.model` is the registry of loaded, warmed-up models;
:mod:`~edge.inference.backends` holds the runtimes (ONNX Runtime, TensorRT)
behind :class:`edge.types.Backend`.
"""
