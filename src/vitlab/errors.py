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

import sys
from typing import Any

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


# ------------------------------------------------------------------ how the command line reports them
def check_device(name: str | None) -> None:
    """Refuse a device string torch does not know, or a device this machine / build lacks.

    Raises:
        DeviceError: With what was expected (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
    """
    import torch

    if name is None or name == "auto":
        return
    expected = "expected auto, cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {name!r}; {expected}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"device {name!r} requested but {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {name!r} requested but MPS is not available; use --device cpu (or auto)")
    elif dev.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported by vitlab; {expected}")


def _one_line(text: str, limit: int = 600) -> str:
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _os_error_message(e: OSError) -> str:
    import errno

    where = e.filename if e.filename is not None else "(unknown path)"
    if e.errno == errno.ENOSPC:
        return (f"no space left on device while writing {where}; nothing partial was kept (an earlier "
                f"checkpoint stays intact). Free some space and run again")
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}; choose a path you can write to"
    if e.errno == errno.ENOTDIR:
        return f"{where}: part of this path is a file, not a folder; choose another output path"
    if e.errno == errno.EEXIST:
        return f"{where} exists and is not a folder; choose another output path"
    if e.errno == errno.EISDIR:
        return f"{where} is a folder; expected a file"
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only file system; choose another output path"
    if isinstance(e, FileNotFoundError) and e.filename is None:
        return str(e)  # vitlab's own messages say what was missing and what to do
    return f"{e.strerror or e}: {where}"


def _resume_hint(args: Any) -> str:
    if args.command != "train":
        return ""
    run_dir = getattr(args, "run_dir", None) or args.output_dir
    if not run_dir:
        return "; resume with: vitlab train --output-dir DIR --resume (DIR: the run directory)"
    config = f" --config {args.config}" if getattr(args, "config", None) else ""
    return f"; resume with: vitlab train{config} --output-dir {run_dir} --resume"


def report_error(e: BaseException, args: Any) -> int:
    """Print ``e`` as one line on stderr and return the exit code (see :mod:`vitlab.errors`)."""
    prefix = f"vitlab {args.command}: "
    if isinstance(e, KeyboardInterrupt):
        print(f"{prefix}interrupted; nothing partial was saved{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    code = EXIT_FAILURE
    if isinstance(e, VitlabError):
        message, code = str(e), e.exit_code
    elif isinstance(e, OSError) and not (isinstance(e, FileNotFoundError) and e.filename is None):
        message = _os_error_message(e)
        code = EXIT_USAGE if isinstance(e, (FileNotFoundError, NotADirectoryError, FileExistsError,
                                            IsADirectoryError)) else EXIT_FAILURE
        hint = _resume_hint(args)
        if hint and code == EXIT_FAILURE:
            message += f" ({hint.removeprefix('; ')})"
    elif isinstance(e, (ValueError, FileNotFoundError, ImportError)):
        message, code = str(e), EXIT_USAGE
    elif type(e).__name__ == "TrainingDiverged":
        message = str(e)
    elif isinstance(e, (RuntimeError, AssertionError)):
        message = f"{type(e).__name__}: {e} (rerun with --debug for the traceback)"
    else:
        message = f"internal error {type(e).__name__}: {e} (rerun with --debug for the traceback)"
    print(f"{prefix}error: {_one_line(message)}", file=sys.stderr)
    return code


__all__ = [
    "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "CheckpointError", "DeviceError", "InputError",
    "NonFiniteOutputError", "UnknownModelError", "VitlabError", "check_device", "report_error",
]
