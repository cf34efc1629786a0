"""Shared test settings: float64 everywhere, one thread (the CI machine has 2 cores)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
