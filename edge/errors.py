"""The one exception tree of medge.

Every error the library raises on purpose derives from :class:`MedgeError`.
Messages are sentences that name the value or path at fault.
"""

__all__ = [
    "MedgeError",
    "ConfigError",
    "ModelError",
    "EngineBuildError",
    "ProtocolError",
    "DataError",
    "BackendUnavailableError",
]


class MedgeError(Exception):
    """Base class of every error medge raises on purpose."""


class ConfigError(MedgeError):
    """A configuration value is missing, of the wrong type or out of range."""


class ModelError(MedgeError):
    """A model, its manifest or one of its artifacts is unusable."""


class EngineBuildError(ModelError):
    """An engine (TensorRT plan, quantized ONNX) could not be built."""


class BackendUnavailableError(ModelError):
    """The requested backend or precision cannot run on this machine."""


class DataError(MedgeError):
    """Input data (images, masks, annotations, DICOM) cannot be used."""


class ProtocolError(MedgeError):
    """A peer sent a message that breaks the wire protocol.

    Parameters
    ----------
    code : str
        The machine-readable error code sent back to the peer
        (``bad_header``, ``bad_shape``, ``bad_dtype``, ``payload_size``,
        ``unknown_model``, ``overloaded``, ``internal``).
    message : str
        A sentence for humans; never contains patient identifiers.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
