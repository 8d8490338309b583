"""The one error hierarchy of Kiln: every user-facing failure is a KilnError with one clear line."""
from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln raises on purpose; str(err) is one line a user can act on."""


class ModelError(KilnError):
    """The input model is malformed or cannot be read."""


class UnsupportedOpError(KilnError):
    """No op definition and no plugin claims a node."""


class UnsupportedDTypeError(KilnError):
    """A tensor element type Kiln cannot hold."""


class ShapeError(KilnError):
    """Shapes disagree: a profile, an input, or a node's inference."""


class ProfileError(ShapeError):
    """An optimization profile is invalid or contradicts the model."""


class InputError(ShapeError):
    """A runtime input has the wrong name, dtype or shape."""


class PlanFormatError(KilnError):
    """A plan file is truncated, corrupted, foreign or incompatible."""


class BuildError(KilnError):
    """The builder could not produce a plan."""


class CalibrationError(KilnError):
    """INT8 calibration failed: an unknown calibrator, a non-finite activation, or an unusable calibration cache."""
