"""The backward sweeps compiled from C (``occore/lq/_sweep.c``), loaded with ctypes.

:func:`riccati_sweep` has exactly the signature and results of the numpy reference
:func:`occore.lq.riccati.riccati_sweep` (agreement to 1e-12 is tested); :func:`adjoint_sweep` those of
:func:`occore.lq.adjoint.adjoint_sweep`, :func:`gap_terms` those of :func:`occore.local_model.gap_terms`, :func:`linear_states` those of
:func:`occore.local_model.linear_states`. The shared library is built when the package is installed
(``setup.py``: the extension ``occore.lq._csweep``, plain C, no Python C-API). When it is missing or
cannot be loaded, or was built from another version of ``_sweep.c`` than the one beside it (a
stale build in a source checkout: rebuild with ``pip install -e .``), :func:`available` is False and :func:`load_error` says why;
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
import hashlib
import importlib.machinery
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..errors import NotPositiveDefinite

__all__ = ["available", "load_error", "library_path", "riccati_sweep", "adjoint_sweep", "gap_terms", "linear_states"]

logger = logging.getLogger("occore")

_ABI = 4
_lib = None
_error: str | None = None
_tried = False
_riccati = None
_adjoint = None
_gaps = None
_linear = None


def library_path() -> Path | None:
    """The path of the compiled library next to this module, or None when it was not built."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_csweep{suffix}"
        if p.is_file():
            return p
    return None


def _source_hash(path: Path) -> int:
    """The first 60 bits of the SHA-256 of a file (setup.py builds the same number into the library)."""
    return int(hashlib.sha256(path.read_bytes()).hexdigest()[:15], 16)


def _load() -> None:
    global _lib, _error, _tried, _riccati, _adjoint, _gaps, _linear
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
        lib.occ_source_hash.restype = ctypes.c_ulonglong
        built = lib.occ_source_hash()
    except (OSError, AttributeError) as err:
        _error = f"cannot load {path}: {err} (rebuild with `pip install -e .` or reinstall occore)"
        return
    source = path.with_name("_sweep.c")   # beside the library in a source checkout (and in wheels)
    if built and source.is_file() and built != _source_hash(source):
        _error = (f"{path.name} was built from another version of {source.name} (stale build): "
                  "rebuild with `pip install -e .`")
        return
    p, i, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    fn = lib.occ_riccati_sweep
    fn.argtypes = [i, i, i] + [p] * 10 + [d] + [p] * 5 + [p] * 5
    fn.restype = i
    adj = lib.occ_adjoint_sweep
    adj.argtypes = [i, i, i] + [p] * 6
    adj.restype = None
    gt = lib.occ_gap_terms
    gt.argtypes = [i, i, i] + [p] * 8
    gt.restype = i
    ls = lib.occ_linear_states
    ls.argtypes = [i, i, i] + [p] * 7
    ls.restype = None
    _lib, _riccati, _adjoint, _gaps, _linear = lib, fn, adj, gt, ls


def available() -> bool:
    """True when the compiled library is loaded (loads it on the first call)."""
    if not _tried:
        _load()
    return _lib is not None


def load_error() -> str | None:
    """Why the compiled library is not available (None when it is)."""
    available()
    return _error


def _pack(arrays, shapes):
    """Copies ``arrays`` into one new float64 block, each into a view of the shape in ``shapes`` (numpy
    raises when one does not fit, so the C code never reads out of bounds). Returns the block (keep it
    alive during the call) and the addresses of the pieces. One block and one address lookup instead
    of one per array: ``ndarray.ctypes.data`` costs about a microsecond."""
    sizes = [math.prod(s) for s in shapes]
    block = np.empty(sum(sizes))
    base, o, addresses = block.ctypes.data, 0, []
    for a, shape, n in zip(arrays, shapes, sizes):
        block[o:o + n].reshape(shape)[...] = a
        addresses.append(base + 8 * o)
        o += n
    return block, addresses


def riccati_sweep(d, mu: float, second_order: bool, us=None, lower=None, upper=None, k_warm=None, gaps=None):
    """Backward pass over all stages, in C. Same arguments, results and errors as
    :func:`occore.lq.riccati.riccati_sweep`.

    Returns:
        (k (T, nu), K (T, nu, nx), d1, d2, Vx (T+1, nx), Vxx (T+1, nx, nx)); k, K, Vx and Vxx are
        views of one new array.

    Raises:
        NotPositiveDefinite: the regularised Quu (on the free set) is not positive definite at some
            stage (the same stage as the reference).
        ValueError: an array of ``d`` (or a bound) does not have its documented shape.
        RuntimeError: the compiled library is not available.
    """
    if _riccati is None and not available():
        raise RuntimeError(f"compiled sweep unavailable: {_error}")
    T, nx, nu = d.fu.shape
    arrays = [d.fx, d.fu, d.lx, d.lu, d.lxx, d.lux, d.luu]
    shapes = [(T, nx, nx), (T, nx, nu), (T + 1, nx), (T, nu), (T + 1, nx, nx), (T, nu, nx), (T, nu, nu)]
    hess = second_order and d.fxx is not None
    if hess:
        arrays += [d.fxx, d.fux, d.fuu]
        shapes += [(T, nx, nx, nx), (T, nx, nu, nx), (T, nx, nu, nu)]
    if gaps is not None:
        arrays.append(gaps)
        shapes.append((T, nx))
    nb = len(arrays)
    if lower is not None:
        arrays += [us, lower, np.inf if upper is None else upper]
        shapes += [(T, nu)] * 3
        if k_warm is not None:
            arrays.append(k_warm)
            shapes.append((T, nu))
    block, p = _pack(arrays, shapes)
    p2 = p[7:10] if hess else [None] * 3                     # fxx, fux, fuu
    pg = p[nb - 1] if gaps is not None else None
    # us, lower, upper and k_warm (None when not given), or no bounds at all
    pb = (p[nb:] + [None])[:4] if lower is not None else [None] * 4
    nk, nK, nV = T * nu, T * nu * nx, (T + 1) * nx
    out = np.empty(nk + nK + nV + (T + 1) * nx * nx + 2)
    o = out.ctypes.data
    status = _riccati(T, nx, nu, *p[:7], *p2, float(mu), *pb, pg,
                      o, o + 8 * nk, o + 8 * (nk + nK), o + 8 * (nk + nK + nV), o + 8 * (out.size - 2))
    del block
    if status != -1:
        if status >= 0:
            raise NotPositiveDefinite(status)
        raise MemoryError("occ_riccati_sweep: out of memory")
    k = out[:nk].reshape(T, nu)
    K = out[nk:nk + nK].reshape(T, nu, nx)
    Vx = out[nk + nK:nk + nK + nV].reshape(T + 1, nx)
    Vxx = out[nk + nK + nV:-2].reshape(T + 1, nx, nx)
    return k, K, float(out[-2]), float(out[-1]), Vx, Vxx


def adjoint_sweep(d):
    """Returns (lam (T+1, nx), dJ/du (T, nu)); same as :func:`occore.lq.adjoint.adjoint_sweep`."""
    if _adjoint is None and not available():
        raise RuntimeError(f"compiled sweep unavailable: {_error}")
    T, nx, nu = d.fu.shape
    block, p = _pack([d.fx, d.fu, d.lx, d.lu], [(T, nx, nx), (T, nx, nu), (T + 1, nx), (T, nu)])
    lam = np.empty((T + 1, nx))
    grad = np.empty((T, nu))
    _adjoint(T, nx, nu, *p, lam.ctypes.data, grad.ctypes.data)
    del block
    return lam, grad


def gap_terms(d, k, K, gap, Vx, Vxx):
    """(F1, F2, Fd) of a multiple-shooting step; same as :func:`occore.local_model.gap_terms`."""
    if _gaps is None and not available():
        raise RuntimeError(f"compiled sweep unavailable: {_error}")
    T, nx, nu = d.fu.shape
    block, p = _pack([d.fx, d.fu, k, K, gap, Vx, Vxx],
                     [(T, nx, nx), (T, nx, nu), (T, nu), (T, nu, nx), (T + 1, nx), (T + 1, nx), (T + 1, nx, nx)])
    out = np.empty(3)
    if _gaps(T, nx, nu, *p, out.ctypes.data) != 0:
        raise MemoryError("occ_gap_terms: out of memory")
    del block
    return float(out[0]), float(out[1]), float(out[2])


def linear_states(d, k, K, gap):
    """(dx (T+1, nx), du (T, nu)) of the linear model; same as :func:`occore.local_model.linear_states`."""
    if _linear is None and not available():
        raise RuntimeError(f"compiled sweep unavailable: {_error}")
    T, nx, nu = d.fu.shape
    block, p = _pack([d.fx, d.fu, k, K, gap], [(T, nx, nx), (T, nx, nu), (T, nu), (T, nu, nx), (T + 1, nx)])
    dx = np.empty((T + 1, nx))
    du = np.empty((T, nu))
    _linear(T, nx, nu, *p, dx.ctypes.data, du.ctypes.data)
    del block
    return dx, du
