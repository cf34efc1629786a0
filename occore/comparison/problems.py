"""Resolving the problems of a comparison: reference problem names, ``all``, or a user's Python file.

A user file is imported as a module; its problems are ``PROBLEMS`` (a dict name -> Problem, or a
list) when it defines one, otherwise every module-level :class:`occore.Problem`. A file that fails to
import is reported with the file and line where it failed.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import traceback

from ..errors import InputError
from ..problem import Problem
from ..problems import CONSTRAINED, NAMES, make

__all__ = ["resolve_problems", "load_file"]


def _where(path: str, err: BaseException) -> str:
    """'file:line' of the deepest frame of ``err`` inside ``path`` (or of a SyntaxError)."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    real = os.path.realpath(path)
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if os.path.realpath(frame.filename) == real:
            line = frame.lineno
    return f"{path}:{line}" if line is not None else path


def load_file(path: str) -> dict:
    """The problems defined in the Python file ``path``, as {name: Problem}."""
    if not os.path.isfile(path):
        raise InputError(f"problem file {path!r} does not exist")
    name = "occore_user_problems_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    # read as Python source whatever its extension (spec_from_file_location gives None without .py)
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any failure in user code is reported with its place
        sys.modules.pop(name, None)
        raise InputError(f"{_where(path, err)}: importing the problem file failed: "
                         f"{type(err).__name__}: {err}") from err
    found = getattr(module, "PROBLEMS", None)
    if found is None:
        found = {k: v for k, v in vars(module).items() if isinstance(v, Problem)}
    elif not isinstance(found, dict):
        found = {getattr(p, "name", None) or f"problem{i}": p for i, p in enumerate(found)}
    bad = [k for k, v in found.items() if not isinstance(v, Problem)]
    if bad:
        raise InputError(f"{path}: PROBLEMS[{bad[0]!r}] is not an occore.Problem")
    if not found:
        raise InputError(f"{path}: defines no occore.Problem (define them at module level or in PROBLEMS)")
    return {(p.name or k): p for k, p in found.items()}


def resolve_problems(spec, backend: str = "casadi") -> dict:
    """{name: Problem} from ``spec``: "all" (the classic set), "constrained" (the problems with
    state, path or terminal constraints), a name, a comma-separated string, a ``.py`` path, an
    :class:`occore.Problem`, or a list/dict of these."""
    if isinstance(spec, Problem):
        return {spec.name or "problem": spec}
    if isinstance(spec, dict):
        out = {}
        for k, v in spec.items():
            if not isinstance(v, Problem):
                raise InputError(f"problems[{k!r}]: expected an occore.Problem, got {type(v).__name__}")
            out[k] = v
        return out
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise InputError(f"problems: expected 'all', names, .py files or occore.Problem objects "
                         f"(a string, a list or a dict), got {type(spec).__name__}")
    out = {}
    for item in items:
        if isinstance(item, Problem):
            name = item.name or f"problem{len(out)}"
            if name in out and out[name] is not item:      # the later one would replace it
                raise InputError(f"problems: two different problems are named {name!r}; give "
                                 "a dict name -> Problem to compare both")
            out[name] = item
        elif item == "all":
            out.update({n: make(n, backend=backend) for n in NAMES})
        elif item == "constrained":
            out.update({n: make(n, backend=backend) for n in CONSTRAINED})
        elif isinstance(item, str) and (item.endswith(".py") or os.sep in item):
            out.update(load_file(item))
        elif isinstance(item, str) and item in NAMES + CONSTRAINED:
            out[item] = make(item, backend=backend)
        else:
            raise InputError(f"unknown problem {item!r}; valid problems are all, {', '.join(NAMES)}, "
                             f"constrained, {', '.join(CONSTRAINED)}, or a Python file (path ending in .py) "
                             "defining occore.Problem objects")
    if not out:
        raise InputError("problems: none given")
    return out
