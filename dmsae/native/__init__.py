"""Small C kernels for the CPU training step, built with the machine's C compiler on first use and loaded with ctypes.

Each stands behind a pure-torch function that stays the reference and the fallback: without a C compiler, on a
platform where the build fails, or with `DMSAE_NATIVE=0`, that function runs and nothing else changes (the kernels
move no bit). A build is cached per source, compiler flags and CPU (it targets the CPU it runs on) in
`$XDG_CACHE_HOME/dmsae-native` (default ~/.cache/dmsae-native) and written there atomically, so concurrent first
uses (two pytest workers, Dask workers) each end with a whole library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
MAX_PARTS = 64  # kernels.c's thread limit
log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    return os.environ.get("DMSAE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmsae-native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def cpu_id() -> str:
    """What a -march=native build depends on: the CPU's model and instruction-set flags where Linux lists them (a
    home folder shared between machines must not hand one CPU's build to another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags"))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def flag_sets() -> list[list[str]]:
    """The builds to try, best first: AVX2 or AVX-512 where the CPU has them (-march=native), parallel parts on the
    OpenMP threads of the libgomp torch has loaded (-fopenmp: the library asks for libgomp.so.1, which the loader
    finds already loaded), else on threads of the kernels' own; the plain loop where the flags fail."""
    # no contraction of a product and a sum into one fused multiply-add where the C spells two operations (GCC's
    # default for GNU C): the kernels that follow torch's arithmetic round as torch rounds
    base = ["-O3", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
    best = base + (["-march=native"] if platform.machine().lower() in ("x86_64", "amd64") else [])
    with_openmp = [best + ["-fopenmp"]] if torch_uses_libgomp() else []
    return with_openmp + [best] + ([base] if best != base else [])


def torch_uses_libgomp() -> bool:
    """Whether this process has GNU OpenMP loaded under the name a -fopenmp build asks for (torch's pip wheels on
    Linux; another OpenMP runtime beside it would only bring a second team of threads)."""
    try:
        return any(line.rstrip().endswith("/libgomp.so.1") for line in Path("/proc/self/maps").read_text().splitlines())
    except OSError:
        return False


def build(source: Path, flags: list[str]) -> Path:
    """The shared library of `source` built with `flags` for this CPU, compiled once and cached. Raises RuntimeError
    saying why not."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(flags).encode(), cc.encode(), cpu_id().encode()]))
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(done.stderr.strip().splitlines() or [f'exit {done.returncode}'])[-1]}")
        os.replace(tmp, target)
        return target
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} failed: {e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def library(source: Path = SOURCE) -> ctypes.CDLL | None:
    """The loaded library of `source` (the first of `flag_sets` that builds and loads), or None (disabled, or none
    could: said once in the log)."""
    if not enabled():
        return None
    with _lock:
        if str(source) not in _loaded:
            lib, errors = None, []
            for flags in flag_sets():
                try:
                    lib = ctypes.CDLL(str(build(source, flags)))
                    break
                except (OSError, RuntimeError) as e:
                    errors.append(str(e))
            if lib is None:
                log.info("dmsae: the compiled %s is not available (%s); its pure-torch version runs", source.stem,
                         errors[-1])
            _loaded[str(source)] = lib
        return _loaded[str(source)]


PTR, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # each kernel's arguments; every one returns an int (0: done)
    "dmsae_above_f32": [PTR, I64, ctypes.c_float, PTR, PTR, I64, INT, PTR],
    "dmsae_above_i16": [PTR, I64, INT, INT, PTR, PTR, I64, INT, PTR],
    "dmsae_transpose_f32": [PTR, I64, I64, PTR, INT],
    "dmsae_kth_smallest_f32": [PTR, I64, I64, I64, PTR],
    "dmsae_top_f32": [PTR, PTR, I64, I64, INT, PTR, PTR],
    "dmsae_sorted_entries": [PTR, PTR, I64, I64, I64, PTR, INT, PTR, PTR, PTR, PTR],
    "dmsae_by_latent": [PTR, I64, I64, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR, PTR],
    "dmsae_suffix_sums_f32": [PTR, I64, I64, I64, PTR, INT],
    "dmsae_bag_dots_bf16": [PTR, I64, PTR, I64, PTR, PTR, I64, I64, PTR, INT],
    "dmsae_group_bag_sums": [PTR, INT, I64, PTR, PTR, PTR, I64, I64, I64, I64, PTR, I64, PTR, PTR, PTR, INT, INT],
    "dmsae_latent_grads_f32": [PTR, I64, PTR, I64, PTR, PTR, PTR, PTR, PTR, PTR, PTR, INT, I64, I64, PTR, PTR, PTR,
                               INT],
    "dmsae_fired_minimum": [PTR, PTR, I64, I64, PTR, PTR],
    "dmsae_project_rows_f32": [PTR, PTR, I64, I64, INT, INT],
    "dmsae_latent_grads_bf16": [PTR, I64, PTR, I64, I64, PTR, PTR, PTR, PTR, PTR, PTR, I64, I64, PTR, PTR, PTR, INT],
}


def kernel(lib: ctypes.CDLL, name: str):
    """The C function `name` of `lib` with its signature set (once per library)."""
    fn = getattr(lib, name)
    if fn.argtypes is None:
        fn.restype, fn.argtypes = ctypes.c_int, SIGNATURES[name]
    return fn


def thread_parts(units: int, parts: int | None = None) -> int:
    """How many parts a kernel splits its work into: `parts` or torch's thread count, at most MAX_PARTS and at most
    `units` (the pieces of work worth a thread of their own), at least 1."""
    return max(1, min(MAX_PARTS, parts or torch.get_num_threads(), units or 1))


def _plain(t: Tensor, dtype: torch.dtype, dim: int = 1) -> bool:
    """Whether `t` is what a kernel reads through a raw pointer: a contiguous CPU tensor of `dtype` and `dim`."""
    return t.dtype == dtype and t.device.type == "cpu" and t.dim() == dim and t.is_contiguous()


def above_f32(flat: Tensor, thr: Tensor, parts: int | None = None, cap_fraction: float = 1 / 8
              ) -> tuple[Tensor, Tensor] | None:
    """((flat > thr).nonzero().squeeze(1), and flat at those indices) for a contiguous float32 CPU tensor in one read,
    threaded over `parts` ranges (default torch's thread count); None where the kernel is not available or more than
    `cap_fraction` of a range passes (the caller then runs its own path: this one is for sparse masks)."""
    if not _plain(flat, torch.float32):
        return None
    return _search("dmsae_above_f32", flat, (float(thr),), parts, cap_fraction)


# the bit pattern of +inf in each 16-bit float type, read as int16: the positive NaNs read above it
POSITIVE_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def above_16(flat: Tensor, thr: Tensor, parts: int | None = None, cap_fraction: float = 1 / 8
             ) -> tuple[Tensor, Tensor] | None:
    """above_f32 for a contiguous bfloat16 or float16 CPU tensor and a threshold of its type above zero: the entries
    are compared as their bit patterns (see kernels.c), the same indices and values as (flat > thr). None where the
    kernel is not available, the inputs are not such, or more than `cap_fraction` of a range passes."""
    top = POSITIVE_INF_BITS.get(flat.dtype)
    if top is None or not _plain(flat, flat.dtype) or thr.dtype != flat.dtype or thr.numel() != 1:
        return None
    if not float(thr) > 0:  # below zero the patterns of negative floats order backwards
        return None
    found = _search("dmsae_above_i16", flat, (int(thr.reshape(()).view(torch.int16)), top), parts, cap_fraction)
    return None if found is None else (found[0], found[1].view(flat.dtype))


def _search(name: str, flat: Tensor, thr_args: tuple, parts: int | None, cap_fraction: float
            ) -> tuple[Tensor, Tensor] | None:
    """Runs the search kernel `name` over `flat` threaded over `parts` ranges: each range writes its indices and
    values into a room of its own, joined in order here."""
    lib = library()
    if lib is None:
        return None
    n = flat.numel()
    parts = thread_parts(n // 4096, parts)
    cap = int(n / parts * cap_fraction) + 64
    val_type = torch.int16 if flat.element_size() == 2 else flat.dtype
    out, vals = _scratch("idx", parts * cap, torch.int64), _scratch("vals", parts * cap, val_type)
    counts = torch.empty(parts, dtype=torch.int64)
    rc = kernel(lib, name)(flat.data_ptr(), n, *thr_args, out.data_ptr(), vals.data_ptr(), cap, parts,
                           counts.data_ptr())
    found = counts.tolist()
    if rc != 0 or min(found) < 0:
        return None
    # joined into tensors of their own: the rooms are the next call's
    idx, values = (torch.cat([a[t * cap: t * cap + c] for t, c in enumerate(found)]) for a in (out, vals))
    return idx, values


_local = threading.local()


def _scratch(name: str, n: int, dtype: torch.dtype) -> Tensor:
    """A buffer of at least n entries kept for this thread's next call: threads writing into fresh pages fault them
    in one by one, and on a virtual machine those faults cost more than the search (8.0 against 3.6 ms here, two
    threads at the bench's shape). Only the pages a search writes are ever touched."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = buffers[name] = torch.empty(n, dtype=dtype)
    return buf[:n]


def transpose_f32(src: Tensor, out: Tensor) -> bool:
    """out.copy_(src.T) for a contiguous float32 CPU matrix into a contiguous one, in tiles over torch's thread count;
    False (nothing written) where the kernel is not available or the tensors are not such."""
    ok = _plain(src, torch.float32, 2) and _plain(out, torch.float32, 2) and out.shape == src.shape[::-1]
    lib = library() if ok else None
    if lib is None:
        return False
    rows, cols = src.shape
    parts = thread_parts(cols // 32)
    return kernel(lib, "dmsae_transpose_f32")(src.data_ptr(), rows, cols, out.data_ptr(), parts) == 0


def kth_smallest_f32(flat: Tensor, stride: int, k: int) -> Tensor | None:
    """flat[::stride].kthvalue(k).values for a contiguous 1-d float32 CPU tensor, without copying the strided sample
    (a zero comes back as +0, which compares as torch's does); None where the kernel is not available, the input is
    not such, or the sample holds a NaN."""
    lib = library() if _plain(flat, torch.float32) and stride >= 1 else None
    if lib is None:
        return None
    value = torch.empty((), dtype=torch.float32)
    n = (flat.numel() + stride - 1) // stride
    if kernel(lib, "dmsae_kth_smallest_f32")(flat.data_ptr(), n, stride, k, value.data_ptr()) != 0:
        return None
    return value


def top_f32(values: Tensor, index: Tensor, k: int, first_ties: bool = False) -> tuple[Tensor, Tensor] | None:
    """(index[pos], values[pos]) for pos the positions of values.topk(k), in the order of `values` rather than
    topk's: for a contiguous 1-d float32 CPU tensor and an int64 index of its length. Where entries tied with the k-th
    largest would have to be split, `first_ties` keeps the first of them in the order of `values` (a rule of its
    own); without it the call declines (which of them torch keeps is then its own choice: the caller runs
    torch.topk). None where the kernel is not available, the input is not such, there is a NaN, or it declines."""
    ok = (_plain(values, torch.float32) and _plain(index, torch.int64) and values.numel() == index.numel()
          and 0 < k <= values.numel())
    lib = library() if ok else None
    if lib is None:
        return None
    out_idx, out_vals = torch.empty(k, dtype=torch.int64), torch.empty(k, dtype=torch.float32)
    fn = kernel(lib, "dmsae_top_f32")
    if fn(values.data_ptr(), index.data_ptr(), values.numel(), k, int(first_ties), out_idx.data_ptr(),
          out_vals.data_ptr()) != 0:
        return None
    return out_idx, out_vals


def sorted_entries(flat_idx: Tensor, vals: Tensor, m: int, batch: int, ends: list[int]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The step's entries (rows, cols, bags, values) sorted by (bag, latent) in one call: see
    sparse_step.sort_entries, whose torch version this equals. None where the kernel is not available or the inputs
    are not int64 and float32 CPU vectors of one length with indices in [0, batch * m)."""
    ok = (_plain(flat_idx, torch.int64) and _plain(vals, torch.float32) and flat_idx.numel() == vals.numel()
          and m > 0 and batch > 0)
    lib = library() if ok else None
    if lib is None:
        return None
    n = flat_idx.numel()
    rows, cols, bags = (torch.empty(n, dtype=torch.int64) for _ in range(3))
    out_vals = torch.empty(n, dtype=torch.float32)
    group_ends = torch.tensor(ends, dtype=torch.int64)
    fn = kernel(lib, "dmsae_sorted_entries")
    if fn(flat_idx.data_ptr(), vals.data_ptr(), n, m, batch, group_ends.data_ptr(), len(ends), rows.data_ptr(),
          cols.data_ptr(), bags.data_ptr(), out_vals.data_ptr()) != 0:
        return None
    return rows, cols, bags, out_vals


def by_latent(cols: Tensor, m: int, bag: Tensor, rows: Tensor, w_dec: Tensor, w_enc: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """(counts of each latent in [0, m), then bag, rows, w_dec and w_enc gathered in the stable order of cols) in one
    call: see sparse_step.by_latent, whose torch version this equals. None where the kernel is not available or the
    inputs are not int64 / float32 CPU vectors of one length with latents in [0, m)."""
    ok = (all(_plain(t, torch.int64) for t in (cols, bag, rows))
          and all(_plain(t, torch.float32) for t in (w_dec, w_enc))
          and all(t.numel() == cols.numel() for t in (bag, rows, w_dec, w_enc)) and m > 0)
    lib = library() if ok else None
    if lib is None:
        return None
    n = cols.numel()
    counts = torch.empty(m, dtype=torch.int64)
    out = [torch.empty(n, dtype=t.dtype) for t in (bag, rows, w_dec, w_enc)]
    args = [t.data_ptr() for t in (bag, rows, w_dec, w_enc, counts, *out)]
    if kernel(lib, "dmsae_by_latent")(cols.data_ptr(), n, m, *args) != 0:
        return None
    return counts, *out


def group_bag_sums(weight: Tensor, cols: Tensor, vals: Tensor, starts: Tensor, out: Tensor,
                   then: tuple[int, Tensor | None, Tensor] | None = None, dot_lanes: int | None = None) -> bool:
    """out [groups, batch, d], whose row (0, t) the caller set: row (g, t) becomes the weighted sum of weight's rows in
    bag g * batch + t (entries [starts[b], starts[b + 1]) of cols and vals, the last bag ending at their end) plus row
    (g - 1, t), row (0, t) plus its own sum: with a float32 weight, torch's embedding_bag per group and its adds, bit
    for bit; with a bfloat16 one (the bf16 step's copy), the same float32 sums of its rows widened (exactly).
    `then` = (suffix_groups, low, squares), in the same pass: squares [groups, batch] float32 = each row's sum of
    squares (in the kernel's order), then the first suffix_groups groups' rows replaced by their suffix sums (as
    `suffix_sums_f32`) and low (bfloat16, out's shape) = out cast as torch casts. Or (suffix_groups, None, dots), for
    a float32 weight where `flat_dot_order(batch, d)` found an order and every group starts on a 64-byte boundary:
    dots [groups] = each group's residuals' dot with themselves before the suffix sums, bit for bit as torch's
    float32 dot of the flattened group (`dot_lanes`: the order to use, by default that one), then the suffix sums.
    False (nothing written) where the kernel is not available or the inputs are not contiguous CPU tensors of these
    shapes and types (vals and out float32, cols and starts int64)."""
    groups, batch, d = out.shape if out.dim() == 3 else (0, 0, 0)
    half = weight.dtype == torch.bfloat16
    ok = ((_plain(weight, torch.float32, 2) or _plain(weight, torch.bfloat16, 2)) and weight.shape[1] == d
          and groups > 0 and out.is_contiguous() and out.dtype == torch.float32 and out.device.type == "cpu"
          and _plain(cols, torch.int64) and _plain(starts, torch.int64) and starts.numel() == groups * batch
          and _plain(vals, torch.float32) and vals.numel() == cols.numel())
    suffix_groups, low, squares = then if then is not None else (0, None, None)
    dots = None
    if then is not None and low is None:  # the float32 tail: the groups' dots
        dots, squares = squares, None
        dot_lanes = dot_lanes or flat_dot_order(batch, d)
        # out on a 64-byte boundary, as the group flat_dot_order checked (MKL may start an unaligned vector another
        # way); the kernel takes d in multiples of 32 floats, so every group is then on one too
        aligned = out.data_ptr() % 64 == 0
        ok = (ok and aligned and not half and dot_lanes is not None and 1 <= suffix_groups <= groups
              and _plain(dots, torch.float32) and dots.numel() == groups)
    elif then is not None:
        ok = ok and (1 <= suffix_groups <= groups and low.dtype == torch.bfloat16 and low.shape == out.shape
                     and low.is_contiguous() and low.device.type == "cpu" and _plain(squares, torch.float32, 2)
                     and squares.shape == (groups, batch))
    lib = library() if ok else None
    if lib is None:
        return False
    parts = thread_parts(batch // 64)
    return kernel(lib, "dmsae_group_bag_sums")(
        weight.data_ptr(), int(half), weight.shape[0], cols.data_ptr(), vals.data_ptr(), starts.data_ptr(),
        cols.numel(), groups, batch, d, out.data_ptr(), suffix_groups, None if low is None else low.data_ptr(),
        None if squares is None else squares.data_ptr(), None if dots is None else dots.data_ptr(),
        dot_lanes if dots is not None else 0, parts) == 0


_flat_dot_orders: dict[tuple[int, int, int], int | None] = {}


def flat_dot_order(batch: int, d: int) -> int | None:
    """The order (16 or 8 lanes, as `dot_order`) in which `group_bag_sums`'s float32 tail sums each group's [batch, d]
    residuals' squares exactly as torch's float32 dot of the flattened group does (MKL's, split between its threads
    where the kernel splits its parts), or None; found once per shape and thread count on random rows."""
    key = (batch, d, torch.get_num_threads())
    if key in _flat_dot_orders:
        return _flat_dot_orders[key]
    found = None
    if batch > 0 and d > 0 and library() is not None:
        rows = torch.randn(1, batch, d, generator=torch.Generator().manual_seed(batch + d))
        want = rows.flatten().dot(rows.flatten()).reshape(1)
        no_entries = torch.zeros(0, dtype=torch.int64)

        def gives_torchs(lanes: int) -> bool:
            dots = torch.empty(1)
            return (group_bag_sums(torch.zeros(1, d), no_entries, torch.zeros(0), torch.zeros(batch, dtype=torch.int64),
                                   rows.clone(), (1, None, dots), dot_lanes=lanes) and _same_bits(dots, want))

        found = _first_lanes((16, 8), gives_torchs)
    _flat_dot_orders[key] = found
    return found


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two float32 tensors hold the same bits (a NaN equals itself, -0 differs from +0)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _first_lanes(lanes: tuple[int, ...], gives_torchs: Callable[[int], bool]) -> int | None:
    """The first vector width in `lanes` with which a kernel's result is torch's bit for bit (`gives_torchs`), or
    None: how the kernels that follow torch's order of sums find that order, which no library documents."""
    return next((n for n in lanes if gives_torchs(n)), None)


def _starts(counts: Tensor, n: int) -> Tensor | None:
    """[len(counts) + 1] int64: where each latent's entries start, and their end; None unless they add up to n."""
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets if int(offsets[-1]) == n else None


def _latent_inputs(counts: Tensor, bag: Tensor, rows: Tensor, w_dec: Tensor, w_enc: Tensor, dec_grad: Tensor,
                   enc_grad: Tensor) -> bool:
    """Whether the weight-gradient kernels can read these: `by_latent`'s counts [m] and entry arrays (int64 bag and
    rows, float32 weights, one length) and float32 outputs dec_grad [m, d] and enc_grad [d, m], m > 0, all contiguous
    CPU tensors."""
    m, d = dec_grad.shape if dec_grad.dim() == 2 else (0, 0)
    return (m > 0 and _plain(dec_grad, torch.float32, 2) and _plain(enc_grad, torch.float32, 2)
            and enc_grad.shape == (d, m) and _plain(counts, torch.int64) and counts.numel() == m
            and all(_plain(t, torch.int64) for t in (bag, rows))
            and all(_plain(t, torch.float32) for t in (w_dec, w_enc))
            and bag.numel() == rows.numel() == w_dec.numel() == w_enc.numel())


def latent_grads_f32(table: Tensor, x: Tensor, counts: Tensor, bag: Tensor, rows: Tensor, w_dec: Tensor,
                     w_enc: Tensor, dec_grad: Tensor, enc_grad: Tensor, dec: Tensor | None = None,
                     dot_lanes: int | None = None) -> Tensor | None:
    """The weight gradients from the entries grouped by latent (`by_latent`'s counts and arrays), written into
    dec_grad [m, d] (embedding_bag(bag, table, offsets, per_sample_weights=w_dec)) and enc_grad [d, m] (the same of
    rows, x and w_enc, transposed), bit for bit as torch computes them; returns the encoder bias's gradient [m]
    (w_enc summed by latent in entry order, as index_add_). With `dec` [m, d] (the decoder; only where
    `value_grads_in_pass(table, dec)`), w_enc is a gate and each entry's value gradient, torch's
    `_embedding_bag_per_sample_weights_backward` times the gate, is taken in the same pass and stands in w_enc's
    place, its dot in the order `dot_order(d)` found (or, for that check, in `dot_lanes`'s). None (nothing written)
    where the kernel is not available or the inputs are not contiguous float32 / int64 CPU tensors of these
    shapes."""
    m, d = dec_grad.shape if dec_grad.dim() == 2 else (0, 0)
    n = bag.numel()
    if dec is not None and dot_lanes is None:
        dot_lanes = dot_order(d)
        if dot_lanes is None:
            return None
    ok = (_plain(table, torch.float32, 2) and _plain(x, torch.float32, 2) and table.shape[1] == x.shape[1] == d
          and _latent_inputs(counts, bag, rows, w_dec, w_enc, dec_grad, enc_grad)
          and (dec is None or (_plain(dec, torch.float32, 2) and dec.shape == (m, d))))
    lib = library() if ok else None
    offsets = None if lib is None else _starts(counts, n)
    if offsets is None:
        return None
    b_grad = torch.empty(m, dtype=torch.float32)
    value_grads = None if dec is None else torch.empty(n, dtype=torch.float32)
    parts = thread_parts(n // 1024)
    rc = kernel(lib, "dmsae_latent_grads_f32")(
        table.data_ptr(), table.shape[0], x.data_ptr(), x.shape[0], offsets.data_ptr(), bag.data_ptr(), rows.data_ptr(),
        w_dec.data_ptr(), w_enc.data_ptr(), None if dec is None else dec.data_ptr(),
        None if value_grads is None else value_grads.data_ptr(), dot_lanes or 0, d, m, dec_grad.data_ptr(),
        enc_grad.data_ptr(), b_grad.data_ptr(), parts)
    return b_grad if rc == 0 else None


_dot_orders: dict[int, int | None] = {}


def value_grads_in_pass(table: Tensor, dec: Tensor) -> bool:
    """Whether `latent_grads_f32` can take the value gradients (dot products of table's and dec's rows) in its pass
    with torch's bits: float32 CPU rows starting on 64-byte boundaries, of a width whose dot the kernel sums in
    torch's order (`dot_order`)."""
    d = dec.shape[-1]
    return (_plain(table, torch.float32, 2) and _plain(dec, torch.float32, 2) and table.shape[1] == d and d > 0
            and table.data_ptr() % 64 == 0 and dec.data_ptr() % 64 == 0 and dot_order(d) is not None)


def dot_order(d: int) -> int | None:
    """The vector width (16: MKL's AVX-512 order, 8: its AVX2 order) in which the kernel's dot products of width d
    equal torch's float32 ones (MKL's, per CPU and MKL build), or None; found once per width on random rows. One
    latent per entry and gate 1: the bias gradient is then each entry's value gradient (+0 + g = g)."""
    if d in _dot_orders:
        return _dot_orders[d]
    found = None
    if d > 0 and library() is not None:
        gen = torch.Generator().manual_seed(d)
        n = 256
        table, dec, x = (torch.randn(n, d, generator=gen) for _ in range(3))
        bag = torch.randperm(n, generator=gen)
        idx, ones = torch.arange(n), torch.ones(n)
        want = torch.ops.aten._embedding_bag_per_sample_weights_backward(table, dec, idx, idx, bag, 0)

        def gives_torchs(lanes: int) -> bool:
            got = latent_grads_f32(table, x, torch.ones(n, dtype=torch.int64), bag, idx, ones, ones,
                                   torch.empty(n, d), torch.empty(d, n), dec=dec, dot_lanes=lanes)
            return got is not None and _same_bits(got, want)

        found = _first_lanes((16, 8), gives_torchs)
        if found is None:
            log.info("dmsae: torch's float32 dot at width %d follows no order the gradient kernel knows; the value "
                     "gradients take a pass of their own", d)
    _dot_orders[d] = found
    return found


def latent_grads_bf16(table: Tensor, x: Tensor, dec: Tensor, counts: Tensor, bag: Tensor, rows: Tensor, w_dec: Tensor,
                      gate: Tensor, dec_grad: Tensor, enc_grad: Tensor) -> Tensor | None:
    """The bf16 step's weight gradients from bfloat16 rows (table: the gradient at each bag's output, x: the centred
    inputs, whose rows may be strided, dec [m, d]: the decoder) and the entries grouped by latent (`by_latent`'s
    counts and arrays, gate in w_enc's place): each entry's value gradient g = (table[bag] . dec[latent]) * gate,
    written into dec_grad [m, d] (sum of w_dec * table[bag]) and enc_grad [d, m] (sum of g * x[rows], transposed);
    returns the encoder bias's gradient [m] (g summed by latent). float32 products and sums in the kernel's order, not
    torch's bits. None (nothing written) where the kernel is not available (it needs the CPU's bfloat16 dot
    instruction) or the inputs are not such CPU tensors."""
    m, d = dec_grad.shape if dec_grad.dim() == 2 else (0, 0)
    n = bag.numel()
    ok = (_plain(table, torch.bfloat16, 2) and _plain(dec, torch.bfloat16, 2) and dec.shape == (m, d) and d > 0
          and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2 and x.stride(1) == 1
          and x.stride(0) >= d and table.shape[1] == x.shape[1] == d
          and _latent_inputs(counts, bag, rows, w_dec, gate, dec_grad, enc_grad))
    lib = library() if ok else None
    offsets = None if lib is None else _starts(counts, n)
    if offsets is None:
        return None
    b_grad = torch.empty(m, dtype=torch.float32)
    parts = thread_parts(n // 1024)
    rc = kernel(lib, "dmsae_latent_grads_bf16")(
        table.data_ptr(), table.shape[0], x.data_ptr(), x.shape[0], x.stride(0), dec.data_ptr(), offsets.data_ptr(),
        bag.data_ptr(), rows.data_ptr(), w_dec.data_ptr(), gate.data_ptr(), d, m, dec_grad.data_ptr(),
        enc_grad.data_ptr(), b_grad.data_ptr(), parts)
    return b_grad if rc == 0 else None


def suffix_sums_f32(x: Tensor, groups: int, low: Tensor | None = None) -> bool:
    """In place, x[g] += x[g + 1] for g from groups - 2 down to 0 (the same adds in the same order as torch's, the
    same bits) over a contiguous [n_rows, ...] float32 CPU tensor, and with `low` (bfloat16, x's shape) low = x cast
    as torch casts, all in one pass over x. False (nothing written) where the kernel is not available or the tensors
    are not such."""
    ok = x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and 1 <= groups <= x.shape[0]
    if low is not None:
        ok = ok and low.dtype == torch.bfloat16 and low.shape == x.shape and low.is_contiguous()
    lib = library() if ok else None
    if lib is None:
        return False
    n = x[0].numel()
    parts = thread_parts(n // 4096)
    return kernel(lib, "dmsae_suffix_sums_f32")(x.data_ptr(), groups, x.shape[0], n,
                                                low.data_ptr() if low is not None else None, parts) == 0


def bag_dots_bf16(table: Tensor, weight: Tensor, idx: Tensor, bag: Tensor) -> Tensor | None:
    """float32 [n]: entry i's dot product of table[bag[i]] and weight[idx[i]], two bfloat16 matrices of one width,
    the products and their sums in float32 (in the CPU's bfloat16 dot instruction where it has one). What
    torch.ops.aten._embedding_bag_per_sample_weights_backward computes, from 16-bit copies; not its bits. None where
    the kernel is not available or the inputs are not contiguous CPU tensors of those types."""
    ok = (_plain(table, torch.bfloat16, 2) and _plain(weight, torch.bfloat16, 2) and table.shape[1] == weight.shape[1]
          and _plain(idx, torch.int64) and _plain(bag, torch.int64) and idx.numel() == bag.numel())
    lib = library() if ok else None
    if lib is None:
        return None
    n = idx.numel()
    out = torch.empty(n, dtype=torch.float32)
    parts = thread_parts(n // 1024)
    rc = kernel(lib, "dmsae_bag_dots_bf16")(table.data_ptr(), table.shape[0], weight.data_ptr(), weight.shape[0],
                                            idx.data_ptr(), bag.data_ptr(), n, table.shape[1], out.data_ptr(), parts)
    return out if rc == 0 else None



def fired_minimum(cols: Tensor, vals: Tensor, m: int) -> tuple[Tensor, Tensor] | None:
    """(fired [m] bool: the latents with an entry above zero, smallest [m] float32: the least such entry, +inf where
    none) of entries (cols[e], vals[e]) in one pass: what index_add_ of (vals > 0) and scatter_reduce's "amin" give.
    None where the kernel is not available or the inputs are not contiguous int64 / float32 CPU tensors."""
    ok = _plain(cols, torch.int64) and _plain(vals, torch.float32) and cols.numel() == vals.numel() and m >= 0
    lib = library() if ok else None
    if lib is None:
        return None
    smallest, fired = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.bool)
    rc = kernel(lib, "dmsae_fired_minimum")(cols.data_ptr(), vals.data_ptr(), cols.numel(), m, smallest.data_ptr(),
                                            fired.data_ptr())
    return (fired, smallest) if rc == 0 else None


_projection_lanes: dict[tuple[int, int, int], int | None] = {}


def project_rows(grad: Tensor, weight: Tensor) -> bool:
    """grad -= (grad * weight).sum(1, keepdim=True) * weight in place for float32 [rows, d] CPU matrices, bit for
    bit as torch computes it, in one pass where torch took four. False (nothing written) where the kernel is not
    available, the inputs are not such, or torch's row sums on this machine follow neither order the kernel knows
    (checked once per shape on random rows: the order is torch's build's and CPU's, not a documented one)."""
    if not (_plain(grad, torch.float32, 2) and _plain(weight, torch.float32, 2) and grad.shape == weight.shape):
        return False
    lib = library()
    if lib is None:
        return False
    # torch could split a row's sum between its threads for a few rows: the thread count is part of the key
    key = (grad.shape[0], grad.shape[1], torch.get_num_threads())
    if key not in _projection_lanes:
        _projection_lanes[key] = _projection_order(lib, *key[:2])
    lanes = _projection_lanes[key]
    return lanes is not None and _project(lib, grad, weight, lanes) == 0


def _project(lib: ctypes.CDLL, grad: Tensor, weight: Tensor, lanes: int) -> int:
    rows, d = grad.shape
    return kernel(lib, "dmsae_project_rows_f32")(grad.data_ptr(), weight.data_ptr(), rows, d, lanes,
                                                thread_parts(rows // 64))


def _projection_order(lib: ctypes.CDLL, rows: int, d: int) -> int | None:
    """The vector width (8 or 16 floats) with which the kernel's row sums equal torch's at this shape (at most 1024 of
    its rows: torch splits a row's sum between threads, if ever, only for a few rows), or None."""
    gen = torch.Generator().manual_seed(0)
    grad, weight = (torch.randn(min(rows, 1024), d, generator=gen) for _ in range(2))
    expected = grad - (grad * weight).sum(dim=1, keepdim=True) * weight

    def gives_torchs(lanes: int) -> bool:
        got = grad.clone()
        return _project(lib, got, weight, lanes) == 0 and _same_bits(got, expected)

    found = _first_lanes((8, 16), gives_torchs)
    if found is None:
        log.info("dmsae: torch's row sums at [%d, %d] follow no order the projection kernel knows; torch's runs", rows,
                 d)
    return found
