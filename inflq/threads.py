"""CPU thread pools: one hot pool at a time, and workers that sleep when they have nothing to do.

Two things made ``inflq run`` at default settings 2.7x slower than at one thread on a quiet 2-core
machine (and over 10x on a loaded one):

* torch's OpenMP workers (libgomp) *spin* between parallel regions by default. A training
  sequence's batch is a long chain of small operations, so the workers spin more than they work,
  and on a busy machine they spin against the processes that would do the work.
  ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead; libgomp reads it once, when torch loads,
  so it must be in the environment before ``import torch``.
* SciPy's and NumPy's OpenBLAS keep pools of their own (``?syrk`` in :func:`inflq.linalg.gram`), whose
  threads also spin after each call, against torch's. :func:`inflq.linalg.gram` therefore runs BLAS on one
  thread, and only when torch itself uses one; with more torch threads the product stays in torch's
  pool (threadpoolctl controls the BLAS pools).

Importing :mod:`inflq` before torch applies the wait policy; a user's own ``OMP_WAIT_POLICY``
(or ``OMP_NUM_THREADS``) wins. Measured in docs/benchmarks.md ("Threads").
"""

from __future__ import annotations

import os
import sys


def prefer_sleeping_workers() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy or torch is already loaded
    (then it is too late: libgomp has read its environment). Returns whether it was set."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True

