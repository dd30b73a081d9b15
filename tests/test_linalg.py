"""inflq.gram: the symmetric rank-k update used for covariance sums."""

from __future__ import annotations

import pytest
import torch

from inflq.linalg import gram


@pytest.fixture(params=[1, 2], ids=["1-thread-syrk", "2-threads-matmul"], autouse=True)
def torch_threads(request):
    """gram takes BLAS syrk on one torch thread and torch's matmul on more: test both routes."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(300, 40), (7, 129), (1, 3)])
def test_gram_equals_matmul(dtype, shape):
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    want = x.T @ x
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    got = gram(x)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    upper = gram(x, symmetric=False)
    torch.testing.assert_close(torch.triu(upper), torch.triu(want), rtol=tol, atol=tol * float(want.abs().max()))


def test_gram_of_a_non_contiguous_view_and_no_rows():
    x = torch.randn(50, 20)
    torch.testing.assert_close(gram(x.T), x @ x.T, rtol=1e-5, atol=1e-4)
    assert torch.equal(gram(torch.zeros(0, 4)), torch.zeros(4, 4))


def test_gram_uses_one_pool_at_a_time(torch_threads, monkeypatch):
    """BLAS (a second pool) only when torch itself runs one thread, and then on one thread."""
    import inflq.linalg as linalg

    calls = []
    ssyrk, dsyrk, controller = linalg._syrk()

    class Spy:
        def limit(self, limits, user_api):
            calls.append((limits, user_api))
            return controller.limit(limits=limits, user_api=user_api)

    monkeypatch.setattr(linalg, "_syrk", lambda: (ssyrk, dsyrk, Spy()))
    gram(torch.randn(64, 16))
    assert calls == ([(1, "blas")] if torch_threads == 1 else [])


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eigh_on_cuda_matches_the_cpu():  # pragma: no cover - run where a GPU is lent
    from inflq.linalg import eigh

    x = torch.randn(500, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = x.T @ x
    values, vectors = eigh(torch.triu(full), "cuda")
    torch.testing.assert_close(values, torch.linalg.eigh(full)[0], rtol=1e-10, atol=1e-10 * float(values.max()))
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, full, rtol=1e-10, atol=1e-10 * float(full.abs().max()))
