"""rkllmd: the daemon that owns the NPU (or the CPU reference backend) and serves it."""

import os

__version__ = "0.1.0"

# OpenBLAS's worker threads spin for about 0.1 s after each matrix product before they
# sleep. On a 2-core board that spinning takes a core from the CPU backend's own work:
# the numpy code between prefill's products (prefill measured 5-10 % faster without it)
# and the first decode steps after a prefill (about 1.4x slower while it lasts). 4, the
# least OpenBLAS accepts, makes them sleep at once. OpenBLAS reads it once, when numpy
# first loads it, so it is set here, before any rkllmd module imports numpy; a value
# already in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
