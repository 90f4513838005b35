"""The C kernels (dmsae/native) against their torch references (nonzero, a transposed copy, kthvalue, topk, sorts),
built for real with the machine's C compiler into a fresh cache folder, and the fallback when no compiler works."""

from __future__ import annotations

import platform
import stat

import pytest
import torch

from dmsae import native, sparse_step
from dmsae.precision import cpu_flags

needs_cc = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine (set CC)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build for this module's comparisons, in an empty cache folder: not the one an earlier test or run loaded."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        mp.setenv("DMSAE_NATIVE", "1")
        mp.setattr(native, "_loaded", {})
        yield cache / "dmsae-native"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and nothing loaded, for a test that builds (or fails to) on its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("DMSAE_NATIVE", "1")
    monkeypatch.setattr(native, "_loaded", {})
    return tmp_path / "cache" / "dmsae-native"


def values(n: int, seed: int) -> torch.Tensor:
    flat = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0, float("nan")])
    flat[torch.tensor([0, 31, 32, n // 2, n - 1])] = special
    return flat


@needs_cc
@pytest.mark.parametrize("n", [33, 4096 * 3 + 77, 200_003])
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_above_f32_equals_nonzero(built, n, parts):
    """The same indices in the same order, with their values, for ranges that are not whole 32-entry blocks, NaN
    (never above) and infinities, every split into threads; thresholds that let none, a few or most entries through."""
    flat = values(n, seed=n + parts)
    hits = 0
    for thr in (2.0, 1.0, 9.0, float("inf"), -float("inf"), 0.5):
        t = torch.tensor(thr)
        got = native.above_f32(flat, t, parts=parts, cap_fraction=1.0)
        assert got is not None and got[0].dtype == torch.int64
        want = (flat > t).nonzero().squeeze(1)
        assert torch.equal(got[0], want) and torch.equal(got[1], flat[want]), thr
        hits += want.numel()
    assert hits > 0
    assert list(built.glob("kernels-*.so")), "the build was not cached"


@needs_cc
def test_above_f32_declines_what_it_is_not_for(built):
    """More passing entries than the cap, another dtype, a strided view: None, so that the caller's path runs."""
    flat = values(10_000, seed=1)
    assert native.above_f32(flat, torch.tensor(-1.0), cap_fraction=1 / 8) is None  # 84 % pass
    assert native.above_f32(flat.double(), torch.tensor(1.0)) is None
    assert native.above_f32(flat[::2], torch.tensor(1.0)) is None
    assert native.above_f32(flat.view(100, 100), torch.tensor(1.0)) is None


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [33, 4096 * 3 + 77, 200_003])
@pytest.mark.parametrize("parts", [1, 3])
def test_above_16_equals_nonzero(built, dtype, n, parts):
    """The 16-bit search on bit patterns: the indices (flat > thr).nonzero() gives, in order, and the entries, with
    positive and negative NaN (never above: their patterns read above +inf and below zero), both infinities,
    negative zero and a subnormal, for positive thresholds that let none, a few or most entries through."""
    flat = values(n, seed=n + parts).to(dtype)
    flat[1], flat[2] = -float("nan"), -0.0
    flat[3] = torch.finfo(dtype).smallest_normal / 4
    hits = 0
    for thr in (2.0, 1.0, 9.0, float("inf"), 0.5, torch.finfo(dtype).smallest_normal / 8):
        t = torch.tensor(thr, dtype=dtype)
        got = native.above_16(flat, t, parts=parts, cap_fraction=1.0)
        assert got is not None and got[0].dtype == torch.int64 and got[1].dtype == dtype
        want = (flat > t).nonzero().squeeze(1)
        assert torch.equal(got[0], want), thr
        assert torch.equal(got[1].view(torch.int16), flat[want].view(torch.int16)), thr
        hits += want.numel()
    assert hits > n // 2


@needs_cc
def test_above_16_declines_what_it_is_not_for(built):
    """A threshold at or below zero (negative patterns order backwards), of another type, float32 entries, a
    strided view, more passing entries than the cap: None, so that the caller's path runs."""
    flat = values(10_000, seed=1).bfloat16()
    for thr in (0.0, -0.0, -1.0):
        assert native.above_16(flat, torch.tensor(thr, dtype=torch.bfloat16)) is None
    assert native.above_16(flat, torch.tensor(1.0)) is None  # a float32 threshold
    assert native.above_16(flat.float(), torch.tensor(1.0)) is None
    assert native.above_16(flat[::2], torch.tensor(1.0, dtype=torch.bfloat16)) is None
    assert native.above_16(flat, torch.tensor(0.01, dtype=torch.bfloat16), cap_fraction=1 / 8) is None  # ~50 % pass
    assert native.above_16(flat, torch.tensor(2.0, dtype=torch.bfloat16)) is not None  # 2 % pass


def test_no_working_compiler_falls_back(fresh_cache, tmp_path, monkeypatch, caplog):
    """A compiler that fails (or none): the library is None, said once in the log, and the search still exact."""
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(sparse_step, "SMALL", 4096)
    flat = values(50_000, seed=2)
    with caplog.at_level("INFO", logger="dmsae.native"):
        assert native.library() is None
        assert native.above_f32(flat, torch.tensor(2.0)) is None
        got, got_vals = sparse_step.above(flat, torch.tensor(2.0))
    assert torch.equal(got, (flat > 2.0).nonzero().squeeze(1)) and torch.equal(got_vals, flat[got])
    said = [r.getMessage() for r in caplog.records if "not available" in r.getMessage()]
    assert len(said) == 1 and "broken-cc: cannot compile" in said[0]
    assert not native.transpose_f32(torch.ones(64, 64), torch.empty(64, 64))
    assert not list(fresh_cache.glob("*")), "a failed build left a file behind"


@needs_cc
def test_parallel_parts_run_on_torchs_openmp_threads(fresh_cache):
    """Where torch runs on GNU OpenMP, the kernels are built with it and use torch's libgomp, not a second runtime
    (a second team of threads would compete with torch's on the same cores)."""
    if not native.torch_uses_libgomp():
        pytest.skip("this torch does not run on GNU OpenMP")
    assert "-fopenmp" in native.flag_sets()[0]
    assert native.library() is not None
    assert "-fopenmp" in native.flag_sets()[0] and len(list(fresh_cache.glob("kernels-*.so"))) == 1  # the first built
    loaded = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith("/libgomp.so.1")}
    assert len(loaded) == 1, loaded


@needs_cc
def test_a_build_that_fails_falls_back_to_the_next_flags(fresh_cache, tmp_path, monkeypatch):
    """A compiler that cannot build with the first flag set (here: refuses OpenMP) gives the next set's library,
    whose kernels answer the same."""
    cc = native.compiler()
    picky = tmp_path / "picky-cc"
    picky.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && {{ echo "no OpenMP" >&2; exit 1; }}; done\n'
                     f'exec {cc} "$@"\n')
    picky.chmod(picky.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(picky))
    plain = ["-O3", "-shared", "-fPIC"]
    monkeypatch.setattr(native, "flag_sets", lambda: [plain + ["-fopenmp"], plain])
    assert native.library() is not None
    flat = values(50_000, seed=3)
    got = native.above_f32(flat, torch.tensor(2.0))
    assert got is not None and torch.equal(got[0], (flat > 2.0).nonzero().squeeze(1))
    assert len(list(fresh_cache.glob("kernels-*.so"))) == 1


def test_disabled_by_environment(fresh_cache, monkeypatch):
    monkeypatch.setenv("DMSAE_NATIVE", "0")
    assert native.library() is None
    assert not fresh_cache.exists()


@needs_cc
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 64), (4096, 576), (300, 1001)])
@pytest.mark.parametrize("parts", [1, 2, 5])
def test_transpose_f32_equals_torch(built, shape, parts, monkeypatch):
    """Tiles that do not divide the matrix, fewer columns than threads, and every thread count: src.T exactly."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    src = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
    out = torch.full(shape[::-1], float("nan"))
    assert native.transpose_f32(src, out)
    assert torch.equal(out, src.T)


@needs_cc
def test_transpose_f32_declines_what_it_is_not_for(built):
    src = torch.randn(8, 4)
    assert not native.transpose_f32(src, torch.empty(8, 4))  # not the transposed shape
    assert not native.transpose_f32(src.double(), torch.empty(4, 8, dtype=torch.float64))
    assert not native.transpose_f32(src.T, torch.empty(8, 4))  # not contiguous
    assert not native.transpose_f32(src, torch.empty(8, 4).T)


@needs_cc
@pytest.mark.parametrize("n, m", [(0, 5), (1, 1), (1000, 7), (131_072, 4096)])
def test_by_latent_equals_torch(built, n, m, monkeypatch):
    """The counts and the stable grouping by latent of torch (repeated latents keep their order), and no answer for
    a latent out of range, so that the caller sorts in torch."""
    g = torch.Generator().manual_seed(n)
    cols = torch.randint(0, m, (n,), generator=g)
    bag, rows = torch.randint(0, 99, (n,), generator=g), torch.randint(0, 99, (n,), generator=g)
    w_dec, w_enc = torch.randn(n, generator=g), torch.randn(n, generator=g)
    fast = native.by_latent(cols, m, bag, rows, w_dec, w_enc)
    assert fast is not None
    monkeypatch.setenv("DMSAE_NATIVE", "0")
    reference = sparse_step.by_latent(cols, m, bag, rows, w_dec, w_enc)
    for got, want in zip(fast, reference, strict=True):
        assert torch.equal(got, want)
    monkeypatch.setenv("DMSAE_NATIVE", "1")
    assert native.by_latent(torch.tensor([0, m]), m, *(torch.zeros(2, dtype=torch.int64),) * 2,
                            *(torch.zeros(2),) * 2) is None
    assert native.by_latent(cols.int(), m, bag, rows, w_dec, w_enc) is None


def vector_fma() -> bool:
    """Whether this CPU has the vector fused multiply-add the weight-gradient kernel needs (AVX2 and FMA, or
    AVX-512)."""
    flags = cpu_flags()
    return {"avx2", "fma"} <= flags or "avx512f" in flags


def assert_latent_sums(got: tuple[torch.Tensor, ...], table, x, counts, bag_by, rows_by, w_dec_by, w_enc_by, cols,
                       w_enc) -> None:
    """(dec_grad, enc_grad, b_grad) bit for bit as torch's embedding_bag sums by latent (the encoder's transposed) and
    index_add_ of w_enc (entry order) give them."""
    offsets = counts.cumsum(0) - counts
    want_dec = torch.nn.functional.embedding_bag(bag_by, table, offsets, mode="sum", per_sample_weights=w_dec_by)
    want_enc = torch.nn.functional.embedding_bag(rows_by, x, offsets, mode="sum", per_sample_weights=w_enc_by).T
    want_b = torch.zeros(counts.numel()).index_add_(0, cols, w_enc)
    for grad, want in zip(got, (want_dec, want_enc, want_b), strict=True):
        assert torch.equal(grad.view(torch.int32), want.contiguous().view(torch.int32))


@needs_cc
@pytest.mark.parametrize("d", [7, 37, 576])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_latent_grads_equal_torchs(built, d, parts, monkeypatch):
    """Both weight gradients and the bias's, bit for bit as torch's embedding_bag sums (the encoder's transposed) and
    index_add_, for latents with no entries, many, and a count that fills no whole block of 16; widths that are and
    are not whole vectors and register blocks; a NaN in one row; and no answer for an entry's row out of range."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    g = torch.Generator().manual_seed(d * 10 + parts)
    m, n, n_table, n_x = 50, 3000, 300, 120
    cols = torch.randint(0, m - 3, (n,), generator=g)  # the last three latents get no entry
    cols[:400] = 5  # one latent with many
    bag, rows = torch.randint(0, n_table, (n,), generator=g), torch.randint(0, n_x, (n,), generator=g)
    w_dec, w_enc = torch.randn(n, generator=g), torch.randn(n, generator=g)
    table, x = torch.randn(n_table, d, generator=g), torch.randn(n_x, d, generator=g)
    table[bag[7], d // 2] = float("nan")
    counts, bag_by, rows_by, w_dec_by, w_enc_by = sparse_step.by_latent(cols, m, bag, rows, w_dec, w_enc)
    dec_grad, enc_grad = torch.full((m, d), 5.0), torch.full((d, m), 5.0)
    b_grad = native.latent_grads_f32(table, x, counts, bag_by, rows_by, w_dec_by, w_enc_by, dec_grad, enc_grad)
    if b_grad is None:
        assert not vector_fma(), "the kernel declined on a CPU with vector FMA"
        pytest.skip("the kernel needs AVX2 and FMA, or AVX-512")
    assert_latent_sums((dec_grad, enc_grad, b_grad), table, x, counts, bag_by, rows_by, w_dec_by, w_enc_by, cols,
                       w_enc)
    assert dec_grad.isnan().any() and not enc_grad[:, -3:].any()  # the NaN reached its latent; empty latents are 0
    bad = rows_by.clone()
    bad[-1] = n_x
    assert native.latent_grads_f32(table, x, counts, bag_by, bad, w_dec_by, w_enc_by, dec_grad, enc_grad) is None
    assert native.latent_grads_f32(table, x, counts, bag_by, rows_by, w_dec_by, w_enc_by, dec_grad.T, enc_grad) is None


@needs_cc
@pytest.mark.parametrize("d", [7, 37, 576])
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("half", [False, True])
def test_group_bag_sums_equal_torchs(built, d, parts, groups, half, monkeypatch):
    """The residuals' chain bit for bit as the step's torch loop writes it (each group's embedding_bag, added to the
    group before it; the first to the rows the caller set), with empty bags, a token with many entries, a NaN, and a
    -0 in the rows set first; no answer for a latent out of range. A bfloat16 weight (the bf16 step's) gives torch's
    float32 sums of its rows widened (exactly)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    g = torch.Generator().manual_seed(d * 100 + parts * 10 + groups)
    m, batch, n = 40, 33, 900
    bag = torch.randint(0, groups * batch, (n,), generator=g)
    bag[:200] = batch + 1 if groups > 1 else 1  # one token's bag with many entries
    bag = bag[bag % batch != 5]  # token 5: empty bags in every group
    bag = bag.sort().values
    cols = torch.randint(0, m, (bag.numel(),), generator=g)
    vals = torch.randn(bag.numel(), generator=g)
    weight = torch.randn(m, d, generator=g)
    weight[3, d - 1] = float("nan")
    weight_read = weight.bfloat16() if half else weight
    weight = weight_read.float()
    counts = torch.bincount(bag, minlength=groups * batch)
    starts = counts.cumsum(0) - counts
    first = torch.randn(batch, d, generator=g)
    first[5, 0] = -0.0
    want = torch.empty(groups, batch, d)
    want[0] = first
    for gr in range(groups):
        lo = int(starts[gr * batch])
        hi = int(starts[(gr + 1) * batch]) if gr + 1 < groups else bag.numel()
        part = torch.nn.functional.embedding_bag(cols[lo:hi], weight, starts[gr * batch:(gr + 1) * batch] - lo,
                                                 mode="sum", per_sample_weights=vals[lo:hi])
        if gr == 0:
            want[0] += part
        else:
            torch.add(part, want[gr - 1], out=want[gr])
    out = torch.full((groups, batch, d), 7.0)
    out[0] = first
    if not native.group_bag_sums(weight_read, cols, vals, starts, out):
        assert not vector_fma(), "the kernel declined on a CPU with vector FMA"
        pytest.skip("the kernel needs AVX2 and FMA, or AVX-512")
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))
    assert out.isnan().any() and not torch.equal(out[0], first)
    bad = cols.clone()
    bad[0] = m
    assert not native.group_bag_sums(weight_read, bad, vals, starts, out)
    assert not native.group_bag_sums(weight_read, cols, vals, starts[:-1], out)
    assert not native.group_bag_sums(weight_read.half(), cols, vals, starts, out)  # float16: not this kernel's
    # the bf16 step's fused tail: each row's squares, the first suffix_groups rows' suffix sums, the 16-bit copy
    suffix_groups = max(1, groups - 1)
    out, low, squares = torch.full((groups, batch, d), 7.0), torch.zeros(groups, batch, d).bfloat16(), torch.zeros(
        groups, batch)
    out[0] = first
    assert native.group_bag_sums(weight_read, cols, vals, starts, out, (suffix_groups, low, squares))
    finite = want.isfinite().all(-1)
    sq = want.double().pow(2).sum(-1)
    assert ((squares.double() - sq).abs() <= sq * d * 2.0 ** -24)[finite].all() and squares[~finite].isnan().all()
    for gr in range(suffix_groups - 2, -1, -1):
        want[gr] += want[gr + 1]
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))
    assert torch.equal(low.view(torch.int16), want.bfloat16().view(torch.int16))
    assert not native.group_bag_sums(weight_read, cols, vals, starts, out, (groups + 1, low, squares))


@needs_cc
@pytest.mark.parametrize("d", [7, 37, 200, 576])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_latent_grads_bf16_match_float64(built, d, parts, monkeypatch):
    """The bf16 step's weight gradients from 16-bit rows: the decoder's bit for bit as torch's float32 embedding_bag
    of the rows widened; the entries' value gradients (dot products in the kernel's order), the encoder's (from
    strided rows, written transposed) and the bias's within float32 rounding of float64 sums, bounded by the sums of
    the terms' magnitudes; gate zero gives an entry no value gradient. Widths below a chunk, past whole 192-column
    blocks, and both; latents with no entries and many; no answer for a row out of range."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    g = torch.Generator().manual_seed(d * 10 + parts)
    m, n, n_table, n_x = 50, 3000, 300, 120
    cols = torch.randint(0, m - 3, (n,), generator=g)  # the last three latents get no entry
    cols[:400] = 5
    bag, rows = torch.randint(0, n_table, (n,), generator=g), torch.randint(0, n_x, (n,), generator=g)
    w_dec, gate = torch.randn(n, generator=g), torch.rand(n, generator=g)
    gate[::7] = 0
    table, dec = torch.randn(n_table, d, generator=g).bfloat16(), torch.randn(m, d, generator=g).bfloat16()
    x = torch.randn(n_x, d + 9, generator=g).bfloat16()[:, :d]  # strided rows, as the step's [xc | 1 | 0 ...]
    counts, bag_by, rows_by, w_dec_by, gate_by = sparse_step.by_latent(cols, m, bag, rows, w_dec, gate)
    cols_by = torch.repeat_interleave(torch.arange(m), counts)
    dec_grad, enc_grad = torch.full((m, d), 5.0), torch.full((d, m), 5.0)
    b_grad = native.latent_grads_bf16(table, x, dec, counts, bag_by, rows_by, w_dec_by, gate_by, dec_grad, enc_grad)
    if b_grad is None:
        assert "avx512_bf16" not in cpu_flags(), "the kernel declined on a CPU with the bfloat16 dot instruction"
        pytest.skip("the kernel needs AVX-512 with its bfloat16 dot instruction")
    offsets = counts.cumsum(0) - counts
    want_dec = torch.nn.functional.embedding_bag(bag_by, table.float(), offsets, mode="sum",
                                                 per_sample_weights=w_dec_by)
    assert torch.equal(dec_grad.view(torch.int32), want_dec.view(torch.int32))
    terms = table.double()[bag_by] * dec.double()[cols_by]
    g_want, g_abs = terms.sum(1) * gate_by.double(), terms.abs().sum(1) * gate_by.double()
    u, most = 2.0 ** -24, int(counts.max())  # float32's unit roundoff; the longest sum over a latent's entries
    tol_g = g_abs * (d + 1) * u  # each value gradient: d exact products summed in float32, times the gate
    want_enc = torch.nn.functional.embedding_bag(rows_by, x.double(), offsets, mode="sum", per_sample_weights=g_want)
    abs_enc, tol_enc = (torch.nn.functional.embedding_bag(rows_by, x.double().abs(), offsets, mode="sum",
                                                          per_sample_weights=w) for w in (g_abs + tol_g, tol_g))
    assert ((enc_grad.double().T - want_enc).abs() <= abs_enc * most * u + tol_enc).all()
    want_b, abs_b, tol_b = (torch.zeros(m, dtype=torch.float64).index_add_(0, cols_by, w)
                            for w in (g_want, g_abs + tol_g, tol_g))
    assert ((b_grad.double() - want_b).abs() <= abs_b * most * u + tol_b).all()
    assert not enc_grad[:, -3:].any() and not b_grad[-3:].any() and not dec_grad[-3:].any()
    bad = rows_by.clone()
    bad[-1] = n_x
    assert native.latent_grads_bf16(table, x, dec, counts, bag_by, bad, w_dec_by, gate_by, dec_grad, enc_grad) is None
    assert native.latent_grads_bf16(table.float(), x, dec, counts, bag_by, rows_by, w_dec_by, gate_by, dec_grad,
                                    enc_grad) is None


def selection_inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs a selection can get wrong: ties, signed zeros, infinities, keys spread over one exponent or all."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    zeros = torch.where(torch.rand(n, generator=g) < 0.3, torch.zeros(n), x)
    zeros[::7] = -0.0
    wide = x * torch.pow(10.0, torch.randint(-30, 30, (n,), generator=g).float())
    wide[:: max(1, n // 5)] = float("inf")
    return {"normal": x, "ties": torch.round(x * 8) / 8, "zeros": zeros, "wide": wide,
            "narrow": 2.5 + torch.rand(n, generator=g) * 1e-4, "constant": torch.full((n,), 0.25)}


@needs_cc
@pytest.mark.parametrize("n", [1, 2, 1000, 70_001])
@pytest.mark.parametrize("stride", [1, 2, 257])
def test_kth_smallest_f32_equals_kthvalue(built, n, stride):
    """The value of torch.kthvalue over the strided sample for every kind of input and rank, and no answer over a NaN
    (torch orders it above every number) or for a rank out of range."""
    for name, x in selection_inputs(n, seed=n + stride).items():
        sample = x[::stride]
        for k in sorted({1, 2, sample.numel() // 3 + 1, sample.numel()} - {0}):
            if k > sample.numel():
                continue
            got = native.kth_smallest_f32(x, stride, k)
            assert got is not None and got == sample.kthvalue(k).values, (name, k)
    x = torch.randn(n + 10)
    x[(n + 10) // 2] = float("nan")
    assert native.kth_smallest_f32(x, 1, 1) is None
    assert native.kth_smallest_f32(x.double(), 1, 1) is None
    assert native.kth_smallest_f32(x[:5], 1, 6) is None


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride", [1, 257])
def test_sampled_kth_equals_kthvalue_in_each_type(built, dtype, stride):
    """BatchTopK's sampled threshold (16-bit entries through a float32 copy of the sample): torch's kthvalue of the
    sample in the entries' own type, with the ties that rounding to 16 bits makes; a NaN in the sample: torch's."""
    for name, x in selection_inputs(70_001, seed=stride).items():
        flat = x.to(dtype)
        sample = flat[::stride]
        for k in sorted({1, sample.numel() // 3 + 1, sample.numel() - 5, sample.numel()}):
            got = sparse_step.sampled_kth(flat, stride, k)
            assert got.dtype == dtype and got == sample.kthvalue(k).values, (name, k)
    flat = selection_inputs(1000, seed=0)["normal"].to(dtype)
    flat[0] = float("nan")
    assert sparse_step.sampled_kth(flat, 1, 1000).isnan()  # torch orders NaN above every number


@needs_cc
@pytest.mark.parametrize("n", [1, 1000, 263_001])
def test_top_f32_is_topks_set(built, n):
    """The set of torch.topk (its index entries and values, in index order) wherever the k largest are one set
    whatever the tie-breaking; no answer only where ties with the k-th largest must be split, or over a NaN."""
    index = torch.arange(n, dtype=torch.int64) * 3 + 1
    answered = 0
    for name, x in selection_inputs(n, seed=n).items():
        for k in sorted({1, n // 2 + 1, n} - {0}):
            found = native.top_f32(x, index, min(k, n))
            ranked = x.sort(descending=True).values
            split_tie = k < n and ranked[k - 1] == ranked[k]
            if found is None:
                assert split_tie, (name, k)
                continue
            answered += 1
            pos = x.topk(k, sorted=False).indices.sort().values
            assert torch.equal(found[0], index[pos]) and torch.equal(found[1], x[pos]), (name, k)
    assert answered >= 6  # every kind answered at least once
    x = torch.randn(100)
    x[7] = float("nan")
    assert native.top_f32(x, torch.arange(100), 5) is None
    assert native.top_f32(x, torch.arange(99), 5) is None


@needs_cc
@pytest.mark.parametrize("n", [1, 1000, 263_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_first_ties_keeps_the_first_of_the_ties(built, n, dtype, monkeypatch):
    """The bf16 step's top-k: the k largest, and of the entries tied with the k-th largest the first in order, the
    set a stable descending sort's first k gives; in C and in torch (no compiler) alike, in order, as float32."""
    index = torch.arange(n, dtype=torch.int64) * 3 + 1
    split = 0
    for name, x in selection_inputs(n, seed=n + 1).items():
        x = x.to(dtype)
        for k in sorted({1, n // 2 + 1, n - 1, n} - {0}):
            pos = torch.sort(x.float(), descending=True, stable=True).indices[:k].sort().values
            want = (index[pos], x[pos].float())
            split += k < n and bool(x.float().sort(descending=True).values[k - 1:k + 1].diff() == 0)
            found = native.top_f32(x.float(), index, k, first_ties=True)
            assert found is not None and all(torch.equal(a, b) for a, b in zip(found, want, strict=True)), (name, k)
            monkeypatch.setenv("DMSAE_NATIVE", "0")
            in_torch = sparse_step.top_first_ties(x, index, k)
            monkeypatch.setenv("DMSAE_NATIVE", "1")
            assert all(torch.equal(a, b) for a, b in zip(in_torch, want, strict=True)), (name, k)
    assert split >= 3 or n == 1  # ties split: the case the rule is for


@needs_cc
@pytest.mark.parametrize("ends", [[], [32, 96, 256], [0, 511]])
@pytest.mark.parametrize("ascending", [False, True])
def test_sorted_entries_equal_torch(built, ends, ascending, monkeypatch):
    """The step's entries (rows, latents, bags, values) in (bag, latent) order, as the torch path sorts them, for no
    group end, several and ends at the edges, from indices in any order (two counting sorts) or ascending (the
    selection's order: one split by group); no answer for an index outside the batch, so that torch's path runs."""
    g = torch.Generator().manual_seed(len(ends))
    B, m, k = 256, 512, 8
    flat = torch.randperm(B * m, generator=g)[: B * k]
    if ascending:
        flat = flat.sort().values
    vals = torch.randn(flat.numel(), generator=g)
    fast = native.sorted_entries(flat, vals, m, B, ends)
    assert fast is not None
    monkeypatch.setenv("DMSAE_NATIVE", "0")
    reference = sparse_step.sort_entries(flat, vals, m, B, ends)
    for got, want in zip(fast, reference, strict=True):
        assert torch.equal(got, want)
    assert bool((reference[2][1:] >= reference[2][:-1]).all())  # bags ascending, so the check is not vacuous
    assert torch.equal(reference[2] * m + reference[1], torch.sort(reference[2] * m + reference[1]).values)
    monkeypatch.setenv("DMSAE_NATIVE", "1")
    assert native.sorted_entries(torch.tensor([0, B * m]), torch.zeros(2), m, B, ends) is None
    assert native.sorted_entries(flat.int(), vals, m, B, ends) is None


@needs_cc
@pytest.mark.parametrize("groups, rows", [(1, 1), (1, 2), (5, 5), (5, 6), (3, 4)])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_suffix_sums_equal_torchs_adds(built, groups, rows, parts, monkeypatch):
    """The in-place suffix sums over the first `groups` rows, bit for bit as torch's adds in the step's order, and
    the bfloat16 copy of every row (AuxK's past the groups too) as torch casts, NaN and a subnormal included; rows of
    a width that no vector or thread split divides."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    x = torch.randn(rows, 37, 113, generator=torch.Generator().manual_seed(groups * 10 + rows))
    x[0, 0, 0], x[-1, 1, 1], x[0, 2, 2] = float("nan"), 1e-40, 3.0000002
    want, before = x.clone(), x.clone()
    for g in range(groups - 2, -1, -1):
        want[g] += want[g + 1]
    low = torch.empty(x.shape, dtype=torch.bfloat16)
    plain = x.clone()
    assert native.suffix_sums_f32(x, groups, low)
    assert torch.equal(x.view(torch.int32), want.view(torch.int32))
    assert torch.equal(low.view(torch.int16), want.bfloat16().view(torch.int16))
    assert native.suffix_sums_f32(plain, groups)  # without the copy: the same sums
    assert torch.equal(plain.view(torch.int32), want.view(torch.int32))
    assert groups == 1 or not torch.equal(want[0], before[0])  # the sums moved the first row: not vacuous
    assert not native.suffix_sums_f32(x.double(), groups)
    assert not native.suffix_sums_f32(x, groups, low.float())
    assert not native.suffix_sums_f32(x, rows + 1)


@needs_cc
@pytest.mark.parametrize("d", [1, 7, 32, 33, 64, 100, 576])
def test_bag_dots_bf16_are_the_rows_dot_products(built, d):
    """Each entry's dot product of its two bfloat16 rows, summed in float32: within float32 rounding of the exact
    product of the 16-bit values (computed in float64), for widths that are and are not whole vectors; the float32
    per-sample-weight gradient of torch, from the unrounded rows, differs by the 16-bit inputs' own rounding."""
    g = torch.Generator().manual_seed(d)
    n_table, n_weight, n = 50, 30, 400
    table, weight = torch.randn(n_table, d, generator=g), torch.randn(n_weight, d, generator=g)
    idx = torch.randint(0, n_weight, (n,), generator=g)
    bag = torch.sort(torch.randint(0, n_table, (n,), generator=g)).values
    got = native.bag_dots_bf16(table.bfloat16(), weight.bfloat16(), idx, bag)
    assert got is not None and got.dtype == torch.float32
    exact = (table.bfloat16().double()[bag] * weight.bfloat16().double()[idx]).sum(1)
    bound = 1e-6 * (table.bfloat16().double()[bag].abs() * weight.bfloat16().double()[idx].abs()).sum(1) * d ** 0.5
    assert bool(((got.double() - exact).abs() <= bound + 1e-30).all())
    counts = torch.bincount(bag, minlength=n_table)
    full = torch.ops.aten._embedding_bag_per_sample_weights_backward(table, weight, idx, counts.cumsum(0) - counts,
                                                                     bag, 0)
    assert torch.allclose(got, full, rtol=0.05, atol=0.05 * d ** 0.5)
    assert native.bag_dots_bf16(table, weight.bfloat16(), idx, bag) is None  # a float32 table: not this kernel's
    assert native.bag_dots_bf16(table.bfloat16(), weight.bfloat16(), idx, bag[:-1]) is None
    assert native.bag_dots_bf16(table.bfloat16(), weight.bfloat16(), idx + n_weight, bag) is None  # out of range


@needs_cc
def test_fired_minimum_equals_torchs(built):
    """Which latents fired and their least value above zero, as index_add_ and scatter_reduce's "amin" give them, with
    zeros, negatives, a NaN, +inf and latents with no entries; no answer for a latent out of range."""
    g = torch.Generator().manual_seed(3)
    m, n = 60, 5000
    cols = torch.randint(0, 50, (n,), generator=g)  # latents 50 and 51 get only the entries below, the rest none
    vals = torch.randn(n, generator=g)
    vals[::9] = 0
    cols[:3], vals[:3] = 50, torch.tensor([float("nan"), float("inf"), -1.0])
    cols[3], vals[3] = 51, float("nan")  # only a NaN: not fired
    got = native.fired_minimum(cols, vals, m)
    active = vals > 0
    want_fired = torch.zeros(m, dtype=torch.int32).index_add_(0, cols, active.int()) > 0
    want_smallest = torch.full((m,), float("inf")).scatter_reduce(0, cols, torch.where(active, vals, float("inf")),
                                                                 "amin")
    assert got is not None
    assert torch.equal(got[0], want_fired) and torch.equal(got[1], want_smallest)
    assert got[0][50] and not got[0][51] and not got[0][-5:].any()
    assert native.fired_minimum(cols, vals, 40) is None
    assert native.fired_minimum(cols, vals.double(), m) is None


@needs_cc
@pytest.mark.parametrize("rows,d", [(300, 576), (40, 1003), (20, 2304), (1, 576), (64, 64)])
def test_project_rows_equals_torchs(built, rows, d):
    """The decoder-gradient projection in one pass, bit for bit as torch's mul, sum(dim=1), mul and sub, at widths
    whose row sums take each branch of torch's order (a cascade level passed up at 2304 and 1003, leftover vectors,
    a scalar tail at 1003), with NaN and inf rows; on x86 the kernel must know torch's order (a decline there would
    silently cost the speed)."""
    g = torch.Generator().manual_seed(rows + d)
    grad, weight = torch.randn(rows, d, generator=g) * 3, torch.randn(rows, d, generator=g)
    weight = weight / weight.norm(dim=1, keepdim=True)
    if rows > 2:
        grad[1, 5], grad[2, 0] = float("nan"), float("inf")
    want = grad - (grad * weight).sum(dim=1, keepdim=True) * weight
    got = grad.clone()
    done = native.project_rows(got, weight)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert done
    assert torch.equal(got.view(torch.int32), (want if done else grad).view(torch.int32))


@needs_cc
def test_project_rows_declines_other_inputs(built):
    grad, weight = torch.randn(8, 32), torch.randn(8, 32)
    before = grad.clone()
    assert not native.project_rows(grad.double(), weight.double())
    assert not native.project_rows(grad, weight[:, :16])
    assert not native.project_rows(grad.t(), weight.t())
    assert torch.equal(grad, before)


def intel_avx512() -> bool:
    """An Intel CPU with AVX-512, where torch's MKL runs its AVX-512 dot: the order the fused value gradients copy."""
    try:
        intel = "GenuineIntel" in open("/proc/cpuinfo").read()
    except OSError:
        intel = False
    return intel and "avx512f" in cpu_flags()


@needs_cc
@pytest.mark.parametrize("d", [64, 576, 768])
@pytest.mark.parametrize("parts", [1, 2])
def test_latent_grads_with_value_grads_equal_torchs(built, d, parts, monkeypatch):
    """With the decoder passed, each entry's value gradient is taken in the weight-gradient pass: the decoder, encoder
    and bias gradients bit for bit as the step's torch path computes them (torch's value gradients scaled, zeroed
    where the value was clamped, then the sums by latent), with clamped values, AuxK-like entries at their own scale
    and a NaN. On an Intel CPU with AVX-512 the kernel must know torch's dot order (a decline there costs the speed
    silently); elsewhere it may decline, and the step then takes the value gradients in a pass of their own."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    native._dot_orders.pop(d, None)
    g = torch.Generator().manual_seed(d + parts)
    m, n, n_table, n_x, n_main = 40, 2500, 300, 120, 2000
    cols = torch.randint(0, m - 2, (n,), generator=g)
    bag, rows = torch.randint(0, n_table, (n,), generator=g), torch.randint(0, n_x, (n,), generator=g)
    vals = torch.randn(n, generator=g).clamp_min(0)  # about half clamped to zero
    vals[n_main:] = vals[n_main:].abs() + 0.1
    table, x, dec = (torch.randn(k, d, generator=g) for k in (n_table, n_x, m))
    table[bag[9], 3] = float("nan")
    entry_scale = torch.full((n,), 2.0 / 4096)
    entry_scale[n_main:] = 3e-3
    if not native.value_grads_in_pass(table, dec):
        assert not intel_avx512(), "the fused value gradients declined on an Intel CPU with AVX-512"
        pytest.skip("torch's dot order on this CPU is not the kernel's")
    want_g = torch.ops.aten._embedding_bag_per_sample_weights_backward(table, dec, cols, torch.arange(n), bag, 0)
    want_g *= entry_scale
    want_g[:n_main] *= vals[:n_main] > 0
    gate = entry_scale.clone()
    gate[:n_main] *= vals[:n_main] > 0
    counts, bag_by, rows_by, w_dec_by, gate_by = sparse_step.by_latent(cols, m, bag, rows, vals * entry_scale, gate)
    *_, want_g_by = sparse_step.by_latent(cols, m, bag, rows, vals * entry_scale, want_g)
    dec_grad, enc_grad = torch.full((m, d), 5.0), torch.full((d, m), 5.0)
    b_grad = native.latent_grads_f32(table, x, counts, bag_by, rows_by, w_dec_by, gate_by, dec_grad, enc_grad, dec=dec)
    assert b_grad is not None
    assert_latent_sums((dec_grad, enc_grad, b_grad), table, x, counts, bag_by, rows_by, w_dec_by, want_g_by, cols,
                       want_g)
    assert b_grad.isnan().any() and not enc_grad[:, -2:].any()


@needs_cc
def test_value_grads_in_pass_needs_aligned_whole_blocks(built):
    """Rows of a width the kernel's dot orders do not cover, of another type, or off a 64-byte boundary: declined."""
    table, dec = torch.randn(10, 576), torch.randn(10, 576)
    assert not native.value_grads_in_pass(torch.randn(10, 100), torch.randn(10, 100))  # not a multiple of 32
    assert not native.value_grads_in_pass(table.double(), dec.double())
    assert not native.value_grads_in_pass(torch.randn(10 * 576 + 1)[1:].view(10, 576), dec)  # 4 bytes off


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,d", [(256, 128), (300, 576)])
def test_group_bag_sums_float32_tail_equals_torchs(built, threads, batch, d):
    """The float32 tail of the residuals' pass: each group's dot with itself bit for bit as torch's float32 dot of the
    flattened group (MKL's order and thread split, which the kernel's parts must meet), taken before the suffix sums,
    and those bit for bit as `suffix_sums_f32`'s. On an Intel CPU with AVX-512 the order must be found."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native._flat_dot_orders.clear()
        if native.flat_dot_order(batch, d) is None:
            assert not intel_avx512(), "the float32 tail's dot order was not found on an Intel CPU with AVX-512"
            pytest.skip("torch's dot order on this CPU is not the kernel's")
        g = torch.Generator().manual_seed(batch + d + threads)
        groups, m = 4, 50
        bag = torch.randint(0, groups * batch, (3000,), generator=g).sort().values
        cols, vals = torch.randint(0, m, (bag.numel(),), generator=g), torch.randn(bag.numel(), generator=g)
        weight = torch.randn(m, d, generator=g)
        counts = torch.bincount(bag, minlength=groups * batch)
        starts = counts.cumsum(0) - counts
        first = torch.randn(batch, d, generator=g)
        want = torch.empty(groups, batch, d)
        want[0] = first
        assert native.group_bag_sums(weight, cols, vals, starts, want)
        want_dots = torch.stack([r.flatten().dot(r.flatten()) for r in want])
        assert native.suffix_sums_f32(want, groups - 1, None)  # the step's: all groups but the last (AuxK's) summed
        got, dots = torch.empty(groups, batch, d), torch.empty(groups)
        got[0] = first
        assert native.group_bag_sums(weight, cols, vals, starts, got, (groups - 1, None, dots))
        assert torch.equal(dots.view(torch.int32), want_dots.view(torch.int32))
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        # a group off a 64-byte boundary (where MKL may start its vectors another way) is declined, nothing written
        shifted = torch.zeros(groups * batch * d + 1)[1:].view(groups, batch, d)
        shifted[0] = first
        untouched = shifted.clone()
        assert not native.group_bag_sums(weight, cols, vals, starts, shifted, (groups - 1, None, dots))
        assert torch.equal(shifted.view(torch.int32), untouched.view(torch.int32))
    finally:
        torch.set_num_threads(before)
