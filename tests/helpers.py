"""Tiny models of real architectures with random weights, built in the test (nothing downloaded):
:mod:`inflq.testing`'s, which plugins' tests use too; and a comparison to float rounding."""

from __future__ import annotations

import numpy as np
import torch

from inflq.testing import SENTENCES, WORDS, cli, make_model_dir, make_tokenizer, write_corpus

__all__ = ["SENTENCES", "WORDS", "assert_equal_to_rounding", "cli_ok", "make_model_dir", "make_tokenizer", "write_corpus"]


def cli_ok(*args: object) -> str:
    """``inflq ARGS...`` in this process (:func:`inflq.testing.cli`), which must succeed: what it printed."""
    got = cli(*args)
    assert got.code == 0, (args, got.err[-2000:])
    return got.out


def assert_equal_to_rounding(got, want, ulps: int = 4, what: object = "") -> None:
    """``got`` equals ``want`` up to float rounding: every element within ``ulps`` units in the last
    place of the tensor's largest magnitude. Where the same sums run with other shapes (a batch split
    into groups, another thread count or memory alignment), BLAS may block them differently: on
    AVX-512 CPUs such results differ in the last bit, on others they come out bitwise equal."""
    got = torch.as_tensor(np.asarray(got) if not isinstance(got, torch.Tensor) else got)
    want = torch.as_tensor(np.asarray(want) if not isinstance(want, torch.Tensor) else want)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    tol = ulps * torch.finfo(want.dtype).eps * scale
    worst = float((got - want).abs().max()) if want.numel() else 0.0
    assert worst <= tol, (what, worst, tol)
