"""Checks of the files and folders a command will write, made before any work.

Each check tries what the write will do (create a file in the folder), so it also refuses what
permission bits do not show: a read-only mount, ``/proc``, a folder root cannot write in.

Example:
    >>> output_file_problem("/no/such/dir/out.json")
    'cannot write /no/such/dir/out.json: the folder /no/such/dir does not exist'
    >>> output_file_problem("out.txt", PLOT_FORMATS)
    "out.txt: unknown figure format 'txt'; use one of .png, .pdf, .svg, .jpg, .jpeg, .eps, .ps, .tif, .tiff, .webp, .pgf"
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from .errors import OccoreError

__all__ = ["PLOT_FORMATS", "output_file_problem", "output_folder_problem", "check_outputs", "check_path_argument"]

#: figure formats matplotlib writes (savefig infers the format from the extension)
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "pgf")


def check_path_argument(path, file_ok: bool = False) -> None:
    """``path`` (a function's argument named ``path``) is a file name, a ``str`` or an
    ``os.PathLike``, or with ``file_ok`` an open binary file (an object with ``write``); else a
    ``TypeError`` naming it. (``open(1)`` would take a number for a file descriptor.)

    Example:
        >>> check_path_argument(5)
        Traceback (most recent call last):
        ...
        TypeError: path: expected a file name (str or path), got int
    """
    if isinstance(path, (str, os.PathLike)) or (file_ok and callable(getattr(path, "write", None))):
        return
    what = "a file name (str or path) or a binary file" if file_ok else "a file name (str or path)"
    raise TypeError(f"path: expected {what}, got {type(path).__name__}")


def _cannot_create_in(folder: Path) -> Optional[str]:
    """Why no file can be created in ``folder`` (lower case), or None."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".occore-write-test-"):
            pass
    except OSError as err:
        return (err.strerror or str(err)).lower()
    return None


def output_file_problem(path: str, formats: Optional[Sequence[str]] = None) -> Optional[str]:
    """What stops writing the file ``path`` (one line naming it), or None.

    Args:
        path: the file to be written (it may exist: it will be replaced).
        formats: the allowed extensions without the dot (for figures), or None for any.
    """
    if str(path) == "":          # Path("") is the current folder
        return "an empty file name"
    p = Path(path)
    if p.is_dir():
        return f"{path} is a folder, expected a file name"
    folder = p.absolute().parent
    if not folder.is_dir():
        return f"cannot write {path}: the folder {folder} does not exist"
    why = _cannot_create_in(folder)
    if why is None and p.exists():
        try:
            open(p, "ab").close()      # append mode writes nothing: the file stays as it is
        except OSError as err:
            why = (err.strerror or str(err)).lower()
    if why is not None:
        return f"cannot write {path}: not writable ({why})"
    ext = p.suffix.lower().lstrip(".")
    if formats is not None and ext not in formats:
        return (f"{path}: unknown figure format {ext or '(none)'!r}; use one of "
                f"{', '.join('.' + f for f in formats)}")
    return None


def output_folder_problem(folder: str) -> Optional[str]:
    """What stops writing files in ``folder``, created if missing (its nearest existing parent
    must then be a folder one can write in), or None."""
    if str(folder) == "":        # Path("") is the current folder: the command would write there
        return "an empty folder name"
    p = Path(folder)
    if p.exists() and not p.is_dir():
        return f"{folder} is a file, expected a folder"
    existing = next(q for q in (p.absolute(), *p.absolute().parents) if q.exists())
    if not existing.is_dir():
        return f"cannot create {folder}: {existing} is a file, expected a folder"
    why = _cannot_create_in(existing)
    return f"cannot write in {existing}: not writable ({why})" if why is not None else None


def check_outputs(plot: Optional[str] = None, json: Optional[str] = None) -> None:
    """Raise :class:`~occore.errors.OccoreError` (one line, naming ``--plot`` / ``--json``) unless
    both outputs can be written, are different files, and matplotlib is there for the plot."""
    for option, path, formats in (("--plot", plot, PLOT_FORMATS), ("--json", json, None)):
        if path is not None:
            problem = output_file_problem(path, formats)
            if problem is not None:
                raise OccoreError(f"{option}: {problem}")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise OccoreError("--plot needs matplotlib, which is not installed "
                              "(pip install matplotlib)") from None
    if plot and json and os.path.abspath(plot) == os.path.abspath(json):
        raise OccoreError(f"--plot and --json name the same file {plot}")
