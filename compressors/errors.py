"""Errors raised by ctxzip. Each names the problem so that a user can fix their input."""


class CtxzipError(Exception):
    """Base class of every error ctxzip raises on purpose."""


class BaseModelMismatchError(CtxzipError, ValueError):
    """A compressor, adapter or Memory was made for a different base model."""


class ContextTooLongError(CtxzipError, ValueError):
    """A context is longer than the compressor or model supports."""


class EmptyInputError(CtxzipError, ValueError):
    """An input (context, prompt, dataset) is empty."""


class CorruptArtifactError(CtxzipError, OSError):
    """A saved file is missing, truncated or not what it claims to be."""


class UnsupportedModelError(CtxzipError, ValueError):
    """A method cannot run on the base model's family (its layers lack what the method needs); the message names
    the method, the family and the reason (``compressors.attention.unsupported`` builds it)."""


class UnknownCompressorError(CtxzipError, KeyError):
    """No compressor is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""
