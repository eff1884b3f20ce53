"""medge: a streaming edge-inference appliance for imaging devices.

The daemon core (this package) never imports ``trainer``, torch or onnx.
Research use only; the bundled models are synthetic and not for clinical use.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
