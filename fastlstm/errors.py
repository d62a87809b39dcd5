"""fastlstm's exceptions.

Every error fastlstm raises on purpose is a FastLSTMError.  Shape errors are
also ValueError and dtype errors also TypeError, so callers can catch them
the usual way.
"""


class FastLSTMError(Exception):
    """Base class of every error fastlstm raises on purpose."""


class ShapeError(FastLSTMError, ValueError):
    """An argument has the wrong number of dimensions or the wrong sizes."""


class DTypeError(FastLSTMError, TypeError):
    """An argument has a dtype fastlstm cannot use (object, str, complex ...)."""


class WeightsError(FastLSTMError, ValueError):
    """Weights are missing, unexpected or mis-shaped."""


class FormatError(FastLSTMError, ValueError):
    """A file or parameter tree is malformed, truncated or not understood."""
