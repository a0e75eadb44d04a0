"""vitlab's user-facing exceptions and the exit codes of the ``vitlab`` command.

Every error a user can cause (a bad argument, input, config value, file or device) is raised
as a :class:`VitlabError` subclass, which also derives from the built-in type code that does
not know vitlab would catch (``ValueError``, ``FileNotFoundError``, ``RuntimeError``). The
command line prints any of them as one line, ``vitlab COMMAND: error: MESSAGE``, and exits
with the code below; ``--debug`` shows the traceback instead.

=====  ============================================================================
code   meaning
=====  ============================================================================
0      success
1      the run failed: I/O error (disk full, permission), diverging loss, non-finite
       model outputs, an unexpected internal error
2      usage or input error: bad argument, config value, image, checkpoint, model
       name or device (argparse's own errors use 2 as well)
130    interrupted (Ctrl-C); nothing partial was saved
=====  ============================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class VitlabError(Exception):
    """Base of vitlab's user-facing errors; ``exit_code`` is what the CLI exits with."""

    exit_code: int = EXIT_USAGE


class InputError(VitlabError, ValueError):
    """An image, array or tensor vitlab cannot take as an image (range, dtype, size, pixels)."""


class UnknownModelError(VitlabError, ValueError):
    """A model name that is neither registered nor an alias of a registered model."""


class DeviceError(VitlabError, ValueError):
    """A device string torch does not know, or a device this machine / torch build lacks."""


class CheckpointError(VitlabError, ValueError):
    """A file or folder that is not a readable checkpoint."""


class NonFiniteOutputError(VitlabError, RuntimeError):
    """The model produced NaN or infinite outputs (corrupt or diverged weights)."""

    exit_code = EXIT_FAILURE


__all__ = [
    "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CheckpointError", "DeviceError", "InputError",
    "NonFiniteOutputError", "UnknownModelError", "VitlabError",
]
