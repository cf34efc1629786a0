"""Build of the compiled backward sweep (pyproject.toml holds every other setting).

``occore/lq/_sweep.c`` is plain C without the Python C-API: it is built as the shared library
``occore.lq._csweep`` and loaded with ctypes (``occore/lq/csweep.py``). The build is optional: without
a C compiler occore installs anyway and uses its numpy sweep (a warning is logged once).
"""
import hashlib
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class _BuildCLibrary(build_ext):
    """build_ext for a ctypes library: no PyInit_ symbol to export (needed by MSVC)."""

    def get_export_symbols(self, ext):
        return []


_flags = [] if sys.platform == "win32" else ["-O2", "-std=c99", "-fno-fast-math"]
_SOURCE = "occore/lq/_sweep.c"
# Built into the library so that occore/lq/csweep.py can tell a stale build from the source beside it.
_hash = int(hashlib.sha256((Path(__file__).resolve().parent / _SOURCE).read_bytes()).hexdigest()[:15], 16)

setup(
    ext_modules=[Extension("occore.lq._csweep", sources=[_SOURCE], extra_compile_args=_flags,
                           define_macros=[("OCC_SOURCE_HASH", f"{_hash:#x}ULL")], optional=True)],
    cmdclass={"build_ext": _BuildCLibrary},
)
