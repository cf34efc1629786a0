"""The backward sweeps compiled from C (``occore/lq/_sweep.c``), loaded with ctypes.

:func:`riccati_sweep` has exactly the signature and results of the numpy reference
:func:`occore.lq.riccati.riccati_sweep` (agreement to 1e-12 is tested); :func:`adjoint_sweep` those of
:func:`occore.lq.adjoint.adjoint_sweep`. The shared library is built when the package is installed
(``setup.py``: the extension ``occore.lq._csweep``, plain C, no Python C-API). When it is missing or
cannot be loaded, :func:`available` is False and :func:`load_error` says why;
:func:`occore.lq.compiled.best_sweep` then falls back to numpy.

Setting the environment variable ``OCCORE_NO_CSWEEP=1`` disables the compiled sweeps.

Example:
    >>> import numpy as np, occore
    >>> from occore.lq import csweep, riccati
    >>> prob = occore.problems.make("pendulum")
    >>> traj = prob.rollout(prob.initial_controls())
    >>> d = prob.evaluate_derivatives(traj.xs, traj.us)
    >>> sweep = csweep.riccati_sweep if csweep.available() else riccati.riccati_sweep
    >>> k, K, d1, d2, Vx, Vxx = sweep(d, 1e-9, False)
    >>> bool(np.allclose(K, riccati.riccati_sweep(d, 1e-9, False)[1], rtol=1e-12, atol=0))
    True
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import NotPositiveDefinite

__all__ = ["available", "load_error", "library_path", "riccati_sweep", "adjoint_sweep"]

logger = logging.getLogger("occore")

_ABI = 1
_lib = None
_error: str | None = None
_tried = False
_riccati = None
_adjoint = None


def library_path() -> Path | None:
    """The path of the compiled library next to this module, or None when it was not built."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_csweep{suffix}"
        if p.is_file():
            return p
    return None


def _load() -> None:
    global _lib, _error, _tried, _riccati, _adjoint
    _tried = True
    if os.environ.get("OCCORE_NO_CSWEEP", "") not in ("", "0"):
        _error = "disabled by OCCORE_NO_CSWEEP"
        return
    path = library_path()
    if path is None:
        _error = (f"compiled sweep not built (no _csweep{importlib.machinery.EXTENSION_SUFFIXES[0]} in "
                  f"{Path(__file__).resolve().parent}); reinstall occore with a C compiler available")
        return
    try:
        lib = ctypes.CDLL(str(path))
        if lib.occ_sweep_abi() != _ABI:
            raise OSError(f"ABI {lib.occ_sweep_abi()} != {_ABI} (stale build: reinstall occore)")
    except (OSError, AttributeError) as err:
        _error = f"cannot load {path}: {err}"
        return
    p, i, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    fn = lib.occ_riccati_sweep
    fn.argtypes = [i, i, i] + [p] * 10 + [d] + [p] * 4 + [p] * 5
    fn.restype = i
    adj = lib.occ_adjoint_sweep
    adj.argtypes = [i, i, i] + [p] * 6
    adj.restype = None
    _lib, _riccati, _adjoint = lib, fn, adj


def available() -> bool:
    """True when the compiled library is loaded (loads it on the first call)."""
    if not _tried:
        _load()
    return _lib is not None


def load_error() -> str | None:
    """Why the compiled library is not available (None when it is)."""
    available()
    return _error


def _c(a):
    """``a`` as a C-contiguous float64 array (no copy when it already is one)."""
    return np.ascontiguousarray(a, dtype=np.float64)


def riccati_sweep(d, mu: float, second_order: bool, us=None, lower=None, upper=None, k_warm=None):
    """Backward pass over all stages, in C. Same arguments, results and errors as
    :func:`occore.lq.riccati.riccati_sweep`.

    Returns:
        (k (T, nu), K (T, nu, nx), d1, d2, Vx (T+1, nx), Vxx (T+1, nx, nx)).

    Raises:
        NotPositiveDefinite: the regularised Quu (on the free set) is not positive definite at some
            stage (the same stage as the reference).
        RuntimeError: the compiled library is not available.
    """
    if _riccati is None and not available():
        raise RuntimeError(f"compiled sweep unavailable: {_error}")
    T, nx, nu = d.fu.shape
    fx, fu, lx, lu = _c(d.fx), _c(d.fu), _c(d.lx), _c(d.lu)
    lxx, lux, luu = _c(d.lxx), _c(d.lux), _c(d.luu)
    if second_order and d.fxx is not None:
        fxx, fux, fuu = _c(d.fxx), _c(d.fux), _c(d.fuu)
        p2 = (fxx.ctypes.data, fux.ctypes.data, fuu.ctypes.data)
    else:
        p2 = (None, None, None)
    if lower is None:
        pb = (None, None, None, None)
    else:
        us, lower = _c(us), _c(lower)
        upper = np.full((T, nu), np.inf) if upper is None else _c(upper)
        k_warm = None if k_warm is None else _c(k_warm)
        pb = (us.ctypes.data, lower.ctypes.data, upper.ctypes.data,
              None if k_warm is None else k_warm.ctypes.data)
    k = np.empty((T, nu))
    K = np.empty((T, nu, nx))
    Vx = np.empty((T + 1, nx))
    Vxx = np.empty((T + 1, nx, nx))
    dd = np.empty(2)
    status = _riccati(T, nx, nu, fx.ctypes.data, fu.ctypes.data, lx.ctypes.data, lu.ctypes.data,
                      lxx.ctypes.data, lux.ctypes.data, luu.ctypes.data, *p2, float(mu), *pb,
                      k.ctypes.data, K.ctypes.data, Vx.ctypes.data, Vxx.ctypes.data, dd.ctypes.data)
    if status != -1:
        if status >= 0:
            raise NotPositiveDefinite(status)
        raise MemoryError("occ_riccati_sweep: out of memory")
    return k, K, float(dd[0]), float(dd[1]), Vx, Vxx


def adjoint_sweep(d):
    """Returns (lam (T+1, nx), dJ/du (T, nu)); same as :func:`occore.lq.adjoint.adjoint_sweep`."""
    if _adjoint is None and not available():
        raise RuntimeError(f"compiled sweep unavailable: {_error}")
    T, nx, nu = d.fu.shape
    fx, fu, lx, lu = _c(d.fx), _c(d.fu), _c(d.lx), _c(d.lu)
    lam = np.empty((T + 1, nx))
    grad = np.empty((T, nu))
    _adjoint(T, nx, nu, fx.ctypes.data, fu.ctypes.data, lx.ctypes.data, lu.ctypes.data,
             lam.ctypes.data, grad.ctypes.data)
    return lam, grad
