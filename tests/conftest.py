"""Shared fixtures: a tiny randomly initialised Llama with a word-level tokenizer, a generated corpus,
and configs sized so a whole two-cycle distillation runs in seconds on a CPU.

Nothing here downloads anything: the model and tokenizer are built from scratch and saved with
`save_pretrained`, so the real loading path runs.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

# Prefect reads its settings when first imported (test_flow imports it at collection time, after this
# module): a private PREFECT_HOME and no telemetry, so tests never touch ~/.prefect or the network.
_PREFECT_HOME = tempfile.mkdtemp(prefix="dmsae-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
# INFO logs would include the exit-time "Stopping temporary server", written to an already closed stderr
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
atexit.register(shutil.rmtree, _PREFECT_HOME, True)



# The devices a test can run on. A CUDA variant carries the `cuda` mark (`pytest -m cuda` runs them alone, as
# bench/gpu_check.sh does) and skips, at no cost, where torch sees no CUDA device: CI stays on the CPU.
NO_CUDA = "no CUDA device"
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def skip_without_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """"cpu", then "cuda" (skipped with the reason "no CUDA device" where there is none)."""
    if request.param == "cuda":
        skip_without_cuda()
    return request.param


@pytest.fixture(scope="session")
def cuda_device() -> str:
    """For the CUDA variants of tests whose CPU version exists elsewhere (slow ones are not run twice on the CPU)."""
    skip_without_cuda()
    return "cuda"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz", action="store_true",
                     help="a long property-test run: many more config draws (tests marked fuzz)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: runs on a CUDA device, skipped where there is none "
                            "(`pytest -m cuda`: bench/gpu_check.sh)")
    # before test modules are imported, so their @settings inherit the chosen profile
    from hypothesis import settings

    settings.register_profile("dmsae-ci", max_examples=200, derandomize=True, database=None, print_blob=True)
    settings.register_profile("dmsae-fuzz", max_examples=5000, print_blob=True)
    settings.load_profile("dmsae-fuzz" if config.getoption("--fuzz") else "dmsae-ci")


WORDS = [f"w{i:02d}" for i in range(100)]
SPECIALS = ["<unk>", "<s>", "</s>"]
BOS_ID = 1
VOCAB_SIZE = 112  # covers the 103 tokenizer entries
N_DOCS = 300
D_MODEL = 64
N_LAYERS = 4

# A tiny run: 4096 training tokens (64 SAE steps of 64), 256 attribution and 256 eval tokens.
TINY_OVERRIDES = [
    "name=tiny",
    "data.context=32",
    "data.train_tokens=4096",
    "data.attribution_tokens=256",
    "data.eval_tokens=256",
    "data.batch_size=16",
    "harvest.layer=1",
    "harvest.chunk_rows=256",
    "sae.width=128",
    "sae.k=6",
    "sae.group_fractions=[0.125, 0.25]",
    "sae.dead_after_tokens=1024",
    "train.batch_size=64",
    "train.epochs=1",
    "train.lr=0.001",
    "train.shuffle_chunks=4",
    "train.log_every=8",
    "attribution.batch_size=4",
    "cycles=2",
    "interpret.enabled=false",  # tests/integration/test_interpret.py turns it on
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers folder: random 4-layer Llama (d=64) + word-level fast tokenizer with BOS."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert tokenizer.bos_token_id == BOS_ID
    assert len(tokenizer) <= VOCAB_SIZE
    tokenizer.save_pretrained(path)

    config = LlamaConfig(
        hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=128,
        bos_token_id=BOS_ID, eos_token_id=2, initializer_range=0.1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL corpus of N_DOCS short documents with a Zipf-like word distribution."""
    rng = random.Random(7)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(N_DOCS):
            n = rng.randint(4, 40)
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, weights, k=n))}) + "\n")
    return path


@pytest.fixture(scope="session")
def documents(corpus_path: Path) -> list[str]:
    """The corpus documents, read back independently of dmsae.sources."""
    return [json.loads(line)["text"] for line in corpus_path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def make_config(tiny_model_dir: Path, corpus_path: Path) -> Callable[..., object]:
    """make_config(store_root, *overrides) -> dmsae.config.Config for the tiny setup."""
    from dmsae.config import load_config

    def make(store: Path | str, *overrides: str):
        return load_config(None, [f"store={store}", f"model.path={tiny_model_dir}", f"data.path={corpus_path}",
                                  *TINY_OVERRIDES, *overrides])

    return make


@dataclass
class PipelineRun:
    cfg: object  # dmsae.config.Config
    plan: object  # flows.pipeline.Plan
    store: object  # dmsae.store.Store
    computed: dict[str, bool]

    def artifact(self, stage: str, cycle: int | None = None):
        """The node's artifact; a harvest in parts comes with its parts attached, readable as one array."""
        node = self.plan.find(stage, cycle)
        art = self.store.load(node.stage, node.key)
        parts = [p for p in node.inputs.values() if p.stage == "harvest_part"]
        return replace(art, parts=tuple(self.store.load(p.stage, p.key) for p in parts)) if parts else art

    def node(self, label: str):
        """The plan node with this label, e.g. 'reuse[distilled,k=8,seed=0]' or 'evaluate[cycle=0]'."""
        found = [n for n in self.plan.nodes if n.label == label]
        if len(found) != 1:
            raise KeyError(f"{label}: {len(found)} nodes; labels: {[n.label for n in self.plan.nodes]}")
        return found[0]

    def load(self, label: str):
        """The artifact of the node with this label."""
        node = self.node(label)
        return self.store.load(node.stage, node.key)


def run_pipeline(cfg) -> PipelineRun:
    """Run every node of the plan without Prefect, in dependency order."""
    from dmsae.runtime import Runtime
    from dmsae.stores import store_for
    from flows.pipeline import materialize, plan

    p = plan(cfg)
    store = store_for(cfg)
    computed = {}
    for node in p.nodes:
        # on the config's device, as `dmsae run` runs it (cpu for every config but the CUDA tests')
        _, computed[node.label] = materialize(store, node, Runtime(device=cfg.device, show_progress=False))
    return PipelineRun(cfg, p, store, computed)


@pytest.fixture(scope="session")
def pipeline_run(make_config, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """The tiny config run once through flows.pipeline (no Prefect), shared by several test files."""
    cfg = make_config(tmp_path_factory.mktemp("store-a"))
    return run_pipeline(cfg)


@pytest.fixture(scope="session")
def pipeline_runner() -> Callable[..., PipelineRun]:
    return run_pipeline


@pytest.fixture(scope="session")
def vocab() -> dict[str, int]:
    """The tokenizer's word -> id map, known independently of the saved tokenizer."""
    return {tok: i for i, tok in enumerate(SPECIALS + WORDS)}


@pytest.fixture(scope="session")
def bos_id() -> int:
    return BOS_ID


@pytest.fixture(scope="session")
def d_model() -> int:
    return D_MODEL


# Reuse arms: k below sae.width=128 and sae.k=6 not in the list, so the consistency seed runs at k=8.
REUSE_OVERRIDES = ["reuse.k=[4, 8]", "reuse.consistency_seeds=[0, 1]"]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads. On a busy 2-core machine the tiny SAE trainings
    are 10x faster with one thread than with two (two OpenMP threads wait on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reuse_run(pipeline_run, make_config, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """The tiny config with reuse arms (k=4, 8; seed 1 at k=8), run without Prefect on one torch thread.

    It starts from a copy of `pipeline_run`'s store, so only the reuse part (random core, baseline,
    reuse SAEs, evaluations) is computed here, and `pipeline_run`'s store is left as it was."""
    store = tmp_path_factory.mktemp("store-reuse")
    shutil.copytree(pipeline_run.cfg.store, store, dirs_exist_ok=True)
    with torch_threads(1):
        return run_pipeline(make_config(store, *REUSE_OVERRIDES))


@pytest.fixture(scope="session")
def single_thread() -> Callable[[], AbstractContextManager[None]]:
    """`with single_thread():` runs a block on one torch thread, as `reuse_run` was computed."""
    return lambda: torch_threads(1)


@pytest.fixture(scope="session")
def reuse_config_yaml(reuse_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`reuse_run`'s config as a YAML preset, for the command line."""
    import yaml

    path = tmp_path_factory.mktemp("reuse-config") / "tiny-reuse.yaml"
    path.write_text(yaml.safe_dump(reuse_run.cfg.model_dump(mode="json"), sort_keys=False))
    return path



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real S3-compatible server on loopback (SeaweedFS), shared by the tests of a session."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3server")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The server's endpoint and credentials and a cache of this test's own, in this process's environment;
    returns them for subprocesses."""
    env = {**s3_server.env(), "DMSAE_CACHE": str(tmp_path / "cache")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_url(s3_env) -> str:
    """A fresh, empty store prefix on the test server."""
    import uuid

    return f"s3://dmsae/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real `prefect server start` on loopback, shared by the tests of a session (tests/prefectserver.py)."""
    from tests.prefectserver import start_prefect_server

    with start_prefect_server(tmp_path_factory.mktemp("prefect-server-home")) as server:
        yield server
