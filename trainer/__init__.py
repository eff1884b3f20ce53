"""medge trainer: synthetic data, models, training, evaluation, export, quantization.

Offline only; needs the ``trainer`` extra (torch, onnx). May import ``edge``
(manifest, preprocessing) so trainer and daemon preprocess identically.
"""

__all__: list[str] = []
