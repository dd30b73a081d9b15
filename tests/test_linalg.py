"""inflq.gram: the symmetric rank-k update used for covariance sums."""

from __future__ import annotations

import pytest
import torch

from inflq.linalg import gram


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"], autouse=True)
def torch_threads(request):
    """gram takes BLAS syrk (on one BLAS thread) from 256 columns and torch's matmul below, at any
    number of torch threads: test both routes at both."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 40), (7, 129), (1, 3), (300, 257), (5, 300)])
def test_gram_equals_matmul(dtype, shape):
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    want = x.T @ x
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    got = gram(x)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    upper = gram(x, symmetric=False)
    torch.testing.assert_close(torch.triu(upper), torch.triu(want), rtol=tol, atol=tol * float(want.abs().max()))
    # Into a buffer: the same values, in the buffer's memory, whatever it held before.
    d = shape[1]
    buf = torch.full((d, d), float("nan"), dtype=dtype)
    assert gram(x, symmetric=False, out=buf) is buf
    assert torch.equal(torch.triu(buf), torch.triu(upper))
    assert gram(x, out=buf) is buf and torch.equal(buf, got)
    with pytest.raises(ValueError, match="out must be"):
        gram(x, out=torch.empty(d + 1, d + 1, dtype=dtype))


def test_gram_of_a_non_contiguous_view_and_no_rows():
    x = torch.randn(50, 20)
    torch.testing.assert_close(gram(x.T), x @ x.T, rtol=1e-5, atol=1e-4)
    assert torch.equal(gram(torch.zeros(0, 4)), torch.zeros(4, 4))


def test_gram_runs_blas_on_one_thread_and_only_where_it_is_faster(torch_threads, monkeypatch):
    """BLAS (a second pool) on one thread, whatever torch's count (it never spins against torch's
    sleeping workers), and only from 256 columns: narrower, torch's product is faster."""
    import inflq.linalg as linalg

    calls = []
    ssyrk, dsyrk, controller = linalg._syrk()

    class Spy:
        def limit(self, limits, user_api):
            calls.append((limits, user_api))
            return controller.limit(limits=limits, user_api=user_api)

    monkeypatch.setattr(linalg, "_syrk", lambda: (ssyrk, dsyrk, Spy()))
    gram(torch.randn(64, 16))
    assert calls == []
    gram(torch.randn(64, 256))
    assert calls == [(1, "blas")]


@pytest.mark.parametrize("n", [1, 5, 40, 1030])
def test_add_upper_adds_the_packed_upper_triangle_in_place(n):
    """add_upper(p, m) is p += pack_upper(m), bitwise (float32 widened exactly into float64), by
    gathered indices up to 1,024 columns and row by row beyond; add_into(packed=True) starts and
    extends packed sums from square parts, and packs a running sum that is still square."""
    from inflq import add_into
    from inflq.linalg import add_upper, pack_upper


    gen = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    start = torch.randn(n * (n + 1) // 2, dtype=torch.float64, generator=gen)
    want = start + pack_upper(a).double()
    got = start.clone()
    assert add_upper(got, a) is got and torch.equal(got, want)
    sums: dict[str, torch.Tensor] = {}
    add_into(sums, {"x": a}, torch.float64, packed=True)
    add_into(sums, {"x": b}, torch.float64, packed=True)
    assert sums["x"].dtype == torch.float64 and torch.equal(sums["x"], pack_upper(a).double() + pack_upper(b).double())
    square = {"x": a.double()}
    add_into(square, {"x": b}, torch.float64, packed=True)
    assert torch.equal(square["x"], pack_upper(a).double() + pack_upper(b).double())
    with pytest.raises(ValueError, match="upper triangle"):
        add_upper(torch.zeros(3, dtype=torch.float64), a if n != 2 else torch.zeros(3, 3))


def test_pack_upper_is_the_upper_triangle_row_by_row():
    """Exactly the entries with i <= j, in row order, for contiguous and transposed matrices;
    unpack_upper puts them back. gram's upper triangle comes back row-major (contiguous), the
    layout the packing reads fastest."""
    from inflq.linalg import pack_upper, unpack_upper

    m = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = torch.tensor([float(m[i, j]) for i in range(7) for j in range(i, 7)], dtype=torch.float64)
    assert torch.equal(pack_upper(m), want)
    assert torch.equal(pack_upper(m.T.contiguous().T), want)  # column-major storage, same values
    assert torch.equal(unpack_upper(want), torch.triu(m))
    with pytest.raises(ValueError):
        pack_upper(torch.zeros(3, 4))
    assert gram(torch.randn(40, 9)).is_contiguous()  # both routes (the fixture)
    assert gram(torch.randn(40, 9), symmetric=False).is_contiguous()


def test_gram_falls_back_to_matmul_for_other_dtypes():
    x = torch.randn(30, 8).to(torch.bfloat16)
    assert torch.equal(gram(x), x.T @ x)


def test_eigh_is_float64_from_the_upper_triangle_on_any_device():
    """inflq.eigh: float64 on the CPU for CPU tensors, for devices without float64 eigh (MPS) and
    where the device's attempt fails (here CUDA is absent): the same answer every time."""
    from inflq.linalg import eigh

    x = torch.randn(200, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = x.T @ x
    want_values, want_vectors = torch.linalg.eigh(full)
    devices = ["cpu", "mps", "cuda"]
    for device in devices:
        values, vectors = eigh(torch.triu(full).to(torch.float32 if device == "mps" else torch.float64), device)
        assert values.dtype == vectors.dtype == torch.float64 and values.device.type == vectors.device.type == "cpu"
        tol = 1e-5 if device == "mps" else 1e-10  # the float32 input is the only difference
        torch.testing.assert_close(values, want_values, rtol=tol, atol=tol * float(want_values.max()))
        recon = vectors @ torch.diag(values) @ vectors.T
        torch.testing.assert_close(recon, full, rtol=tol, atol=tol * float(full.abs().max()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eigh_on_cuda_matches_the_cpu():  # pragma: no cover - run where a GPU is lent
    from inflq.linalg import eigh

    x = torch.randn(500, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = x.T @ x
    values, vectors = eigh(torch.triu(full), "cuda")
    torch.testing.assert_close(values, torch.linalg.eigh(full)[0], rtol=1e-10, atol=1e-10 * float(values.max()))
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, full, rtol=1e-10, atol=1e-10 * float(full.abs().max()))
