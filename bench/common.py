"""Shared pieces of the benchmarks: modes, result rows, timing, machine description, bench inputs."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
STORE = RESULTS / "store"  # the bench's own store: the converted model and the token windows
ANCHOR_PYTHON = REPO / "bench" / ".venv" / "bin" / "python"
CONFIG = REPO / "configs" / "quickstart.yaml"
LAYER = 15  # harvest.layer of the quickstart: layer 15 of SmolLM2-135M's 30
LM_BATCH = 32  # sequences per harvest batch (data.batch_size)
ATTR_BATCH = 8  # sequences per attribution batch (attribution.batch_size)


@dataclass(frozen=True)
class Mode:
    name: str
    harvest_batches: int  # LM batches of 32 x 128 tokens per harvest timing
    harvest_repeats: int  # interleaved passes of stage, bare forward and full forward over those batches
    train_steps: int  # steps of every trainer, at batch 4096
    train_pool: str  # "harvest": the harvest benchmark's own output; "store": the bench store's harvest node
    matmul_repeats: int
    attr_batches: int  # attribution batches of 8 x 128 tokens, each timed (after one warm-up batch)
    attr_core: bool  # also time attribution with a 64-latent core
    cache_repeats: int
    tau_branch: bool
    mem_harvest_windows: int  # N (in windows of 128 tokens) for the harvest memory test; 4N is also run
    mem_train_tokens: int  # N for the training memory test; 4N is also run
    saelens_unit_decoder: bool  # also run SAELens with decoder_init_norm=1.0


# N must be at least one LM batch (harvest) and one full shuffle buffer of 16 chunks of 4096 rows (training),
# or the N run is smaller for reasons that have nothing to do with streaming
QUICK = Mode("quick", harvest_batches=2, harvest_repeats=2, train_steps=8, train_pool="harvest",
             matmul_repeats=10, attr_batches=2, attr_core=False, cache_repeats=1, tau_branch=False,
             mem_harvest_windows=32, mem_train_tokens=65_536, saelens_unit_decoder=False)
FULL = Mode("full", harvest_batches=6, harvest_repeats=5, train_steps=200, train_pool="store",
            matmul_repeats=30, attr_batches=16, attr_core=True, cache_repeats=3, tau_branch=True,
            mem_harvest_windows=128, mem_train_tokens=65_536, saelens_unit_decoder=True)
MODES = {m.name: m for m in (QUICK, FULL)}


@dataclass
class Row:
    """One line of a benchmark table: a measured value, what it is compared with, and the target."""
    what: str
    value: float | None
    unit: str
    versus: str = ""
    versus_value: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None  # None: no target, or not measured
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """What the benchmarks share within one run (the bench inputs and what one benchmark leaves for the next)."""
    mode: Mode
    device: str
    threads: int
    work: Path  # scratch folder of this run, deleted at the end
    quickstart_store: Path
    shared: dict[str, Any] = field(default_factory=dict)


def lm_autocast(device: str) -> str | None:
    """The autocast the pipeline plans for the bench's float32 LM on this device."""
    from flows.pipeline import lm_autocast as planned

    return planned(device, "float32")


def bf16_measured(device: str) -> tuple[bool, str]:
    """Whether the bench measures bf16 on `device`, and why: only where the device runs it natively, by
    dmsae.precision's rule (which refuses bf16 elsewhere). Emulated bfloat16 runs many times slower than float32:
    its rows would time the emulation, and on a 2-core CPU take minutes."""
    from dmsae.precision import native_bf16

    return native_bf16(device)


def bf16_not_measured(what: str, device: str) -> Row:
    return Row(f"{what}: not measured", None, "",
               note=f"{bf16_measured(device)[1]}: bf16 would run emulated, and time the emulation (dmsae refuses it)")


def set_threads(n: int) -> None:
    """Torch threads for this process and its children; also silences transformers' loading bars."""
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def repeat(fn: Callable[[], Any], repeats: int, device: str, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    """Peak resident set size of this process: VmHWM, the high-water mark of its current address space.
    Not ru_maxrss: Linux carries that across fork and exec, so a child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


ENV_THAT_MATTERS = ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "LD_PRELOAD")


BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_fp16")  # `lscpu` flags that decide bf16's speed


def cpu_bf16_flags() -> list[str]:
    """Which of BF16_FLAGS this CPU has (dmsae.precision's rule: bf16 counts as native with amx_bf16 or avx512_bf16)."""
    from dmsae.precision import cpu_flags

    return [f for f in BF16_FLAGS if f in cpu_flags()]


def machine_info(device: str, threads: int) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "ram_gib": _mem_total_gib(), "cpu_bf16_flags": cpu_bf16_flags(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": threads, "os": f"{platform.system()} {platform.release()}", "device": device,
        "gpu": None, "load_average_start": load_average(),
        # settings that change these timings (OpenMP spin-waiting, glibc's allocator), as this run had them
        "env": {k: os.environ[k] for k in ENV_THAT_MATTERS if k in os.environ},
        "parallel_backend": torch.__config__.parallel_info().split("ATen parallel backend:")[-1].strip(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


class FakeArtifact:
    """What a stage function reads from an input artifact (`path`, `file()`, `metrics`), without a store."""

    def __init__(self, path: Path, metrics: dict[str, Any] | None = None):
        self.path = Path(path)
        self.metrics = metrics or {}

    def file(self, name: str) -> Path:
        return self.path / name


def bench_config(**overrides: Any) -> Any:
    from dmsae.config import load_config

    sets = [f"store={STORE}"] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(CONFIG, sets)


def materialize_inputs(stages: tuple[str, ...] = ("model", "tokens")) -> dict[str, Any]:
    """Run the quickstart's model and tokens stages (and, when asked, harvest) into the bench store,
    the way the pipeline does; cached after the first run (the GGUF conversion takes about 25 s)."""
    from dmsae.runtime import Runtime
    from dmsae.stores import store_for
    from flows.pipeline import materialize, plan

    cfg = bench_config()
    p = plan(cfg)
    store = store_for(cfg)
    store.ensure_writable()
    out = {}
    for stage in stages:
        node = p.find(stage)
        art, computed = materialize(store, node, Runtime(show_progress=False))
        out[stage] = art
        if computed:
            print(f"bench: computed the {stage} stage into {STORE}", file=sys.stderr, flush=True)
    return out


def write_windows(folder: Path, windows: torch.Tensor, bos: int, split: str = "train") -> FakeArtifact:
    """A tokens artifact holding only `windows` as its `split`, for running a stage on a subset."""
    from safetensors.torch import save_file

    from dmsae.readers import TOKENS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    save_file({split: windows.contiguous()}, str(folder / TOKENS_FILE))
    return FakeArtifact(folder, {"bos_id": bos})


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)
