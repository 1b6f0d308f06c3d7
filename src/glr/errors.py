"""The errors a user can act on: bad input, bad params, a launch that cannot work.

`glr` reports any `UserError` as one line (`ERROR glr: …`) and exits with status 2
(`glr.cli.main`); anything else is a bug and keeps its traceback. Each message names the file,
row, key or image and the problem. A leaf module: it imports nothing of glr, so every module,
`glr.params` and the model code alike, raises these without importing one another.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or settings; the message says what and where."""


class ParamsError(UserError, ValueError):
    """A params file that does not match the schema; the message names the key."""


class LaunchError(ParamsError):
    """A launch that cannot work as asked (more ranks than GPUs, srun without torchrun)."""


class UnknownBackboneError(ParamsError):
    """A backbone name that is neither in glr's table nor a timm model; the message names
    `model.backbones`, the name and close matches."""


class PretrainedWeightsError(ParamsError):
    """timm's ImageNet weights can be neither fetched nor found; the message says how to
    supply them."""


class PackagedWeightsError(UserError, ValueError):
    """A backbone without a weights package, a package not installed, or a file whose tensors
    do not match the model; the message names the backbone, file and tensor."""


class GLDv2FormatError(UserError, ValueError):
    """A GLDv2 file that is missing or malformed; the message names the file and the problem."""


class ShardError(UserError, RuntimeError):
    """Too many bad images, or an unusable source; the message says which and where."""


class MetricError(UserError, ValueError):
    """A solution or submission that cannot be scored (bad file, unknown query id, ...)."""
