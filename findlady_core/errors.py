"""Exception types. ``InputError`` means the caller's input is bad (CLI exit 2, HTTP 4xx)."""


class FindLadyError(Exception):
    """Base class of every error raised on purpose by findlady_core."""


class InputError(FindLadyError, ValueError):
    """Untrusted input was refused; the message says why."""

    code = "bad_input"


class WeightsError(InputError):
    """A weight file is unsafe, malformed or holds values we refuse (NaN/Inf, wrong dtype)."""

    code = "bad_weights"


class SpecError(InputError):
    """A permutation spec is malformed or does not fit a state dict."""

    code = "bad_spec"


class KeyFileError(InputError):
    """A watermark key is malformed or does not fit the model."""

    code = "bad_key"


class TraceError(InputError):
    """A module could not be turned into a permutation spec (e.g. an unknown op)."""

    code = "trace_failed"
