"""The distillation plan: which stage runs with which parameters and inputs, and its content key.

`plan(cfg)` derives every stage's key from the config alone, without running anything, so status,
branching and the flow all agree on what exists. `materialize` runs one node into the store unless
its artifact is already there.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from dmsae import precision
from dmsae.config import Config
from dmsae.errors import UserError
from dmsae.eval import tasks as probe_tasks
from dmsae.plan import Node, Plan, ancestors
from dmsae.runtime import Runtime
from dmsae.sources import resolve_corpus, resolve_model, sha256_file
from dmsae.store import Artifact, RunRecord, probe_writable
from dmsae.stores import AnyStore
from stages import (
    attribute,
    baseline,
    evaluate,
    frequency_core,
    harvest,
    harvest_part,
    interpret,
    latents,
    model,
    probes,
    random_core,
    reuse,
    select,
    tokens,
    train,
)

STAGES: dict[str, ModuleType] = {
    m.NAME: m for m in (model, tokens, harvest_part, harvest, train, attribute, select, random_core, frequency_core,
                        reuse, baseline, evaluate, probes, interpret, latents)
}


def stage_node(stage: str, params: dict[str, Any], inputs: dict[str, Node], cycle: int | None = None,
               **kwargs: Any) -> Node:
    """A plan node of `stage` at the stage's current VERSION."""
    return Node(stage, STAGES[stage].VERSION, params, inputs, cycle, **kwargs)


def lm_autocast(device: str, dtype: str, lm_precision: str = "fp32") -> str | None:
    """The autocast an LM of `dtype` runs under on `device`: bfloat16 for a float32 model when precision.lm
    resolves to bf16 or (as before precision existed) on CUDA; else none."""
    if dtype != "float32":
        return None
    return "bfloat16" if lm_precision == "bf16" or device.startswith("cuda") else None


def lm_params(cfg: Config, evaluation: bool = False) -> dict[str, Any]:
    """How a stage runs the language model (`evaluation`: the baseline and evaluate stages, whose precision
    precision.eval sets apart unless it says `lm`). Autocast changes the numbers, so it is in the key (`autocast`);
    a float32 forward on the CPU has no such entry (the keys it always had)."""
    apart = evaluation and cfg.precision.eval != "lm"
    field, setting = ("precision.eval", cfg.precision.eval) if apart else ("precision.lm", cfg.precision.lm)
    resolved = precision.resolve(setting, cfg.device, field)
    autocast = lm_autocast(cfg.device, cfg.model.dtype, resolved.precision)
    return {"dtype": cfg.model.dtype} | ({"autocast": autocast} if autocast else {})


def sae_precision(cfg: Config) -> dict[str, str]:
    """The SAE step's precision as the train and reuse keys hold it: nothing for fp32 (the keys they always had);
    for bf16, which changes the numbers, {"precision": "bf16"} and the bf16 step's revision (`bf16_step`)."""
    resolved = precision.resolve(cfg.precision.sae, cfg.device, "precision.sae")
    if resolved.precision == "fp32":
        return {}
    return {"precision": resolved.precision, "bf16_step": STAGES["train"].BF16_STEP}


CORE_ONLY_SAE_FIELDS = ("core_gate", "freeze_core_bias", "freeze_core_encoder", "l0_mode")


def sae_params_for(sae: dict[str, Any], has_core: bool) -> dict[str, Any]:
    """The SAE params in a train key. Without a core the core-only fields change nothing, so they are left
    out: cycle 0 and the no-core arm are then shared by configs that differ only in how a core is gated."""
    return sae if has_core else {k: v for k, v in sae.items() if k not in CORE_ONLY_SAE_FIELDS}


def plan(cfg: Config) -> Plan:
    msrc = resolve_model(cfg.model.path)
    csrc = resolve_corpus(cfg.data.path)
    d = cfg.data
    model_node = stage_node("model", {"kind": msrc.kind, "fingerprint": msrc.fingerprint, "dtype": cfg.model.dtype},
                      {}, args={"location": msrc.location})
    tokens_node = stage_node("tokens", {
        "kind": csrc.kind, "fingerprint": csrc.fingerprint,
        "field": d.field if csrc.kind in ("jsonl", "hub") else None,
        "split": d.split if csrc.kind == "hub" else None,
        "context": d.context, "train_tokens": d.train_tokens, "attribution_tokens": d.attribution_tokens,
        "eval_tokens": d.eval_tokens, "split_seed": d.split_seed,
    }, {"model": model_node}, args={"location": csrc.location})
    harvest_params = {"layer": cfg.harvest.layer, "chunk_rows": cfg.harvest.chunk_rows,
                      "store_dtype": cfg.harvest.store_dtype, **lm_params(cfg),
                      "outlier_factor": cfg.harvest.outlier_factor}
    harvest_inputs = {"model": model_node, "tokens": tokens_node}
    harvest_args = {"batch_size": d.batch_size, "compression": cfg.harvest.compression}  # neither in the key
    parts: list[Node] = []
    if cfg.harvest.parts > 1:  # one task per part; one part keeps the key it always had
        layout = {"parts": cfg.harvest.parts, "shard_chunks": cfg.harvest.shard_chunks}
        parts = [stage_node("harvest_part", {**harvest_params, **layout, "part": i}, harvest_inputs,
                            tag=f"part={i}", args=harvest_args) for i in range(cfg.harvest.parts)]
        harvest_params |= layout
        harvest_inputs = {**harvest_inputs, **{f"part{i}": n for i, n in enumerate(parts)}}
    harvest_node = stage_node("harvest", harvest_params, harvest_inputs, args=harvest_args)
    train_params = cfg.train.model_dump(exclude={"checkpoint_every"}) | sae_precision(cfg)
    nodes = [model_node, tokens_node, *parts, harvest_node]
    core: Node | None = None
    for cycle in range(cfg.cycles):
        train_inputs: dict[str, Node] = {"harvest": harvest_node}
        if core is not None:
            train_inputs["core"] = core
        train_node = stage_node("train", {"cycle": cycle, "seed": cfg.seed,
                                    "sae": sae_params_for(cfg.sae.model_dump(), core is not None),
                                    "train": train_params}, train_inputs, cycle,
                          args={"checkpoint_every": cfg.train.checkpoint_every})
        attr_node = stage_node("attribute", {"layer": cfg.harvest.layer, "score": cfg.attribution.score,
                                       "q": cfg.attribution.q, **lm_params(cfg)},
                         {"model": model_node, "tokens": tokens_node, "harvest": harvest_node, "train": train_node},
                         cycle,
                         args={"batch_size": cfg.attribution.batch_size})
        cap = cfg.selection.core_cap(cfg.sae.k)
        core = stage_node("select", {"cycle": cycle, "tau": cfg.selection.tau} | ({"max_core": cap} if cap else {}),
                    {"attribute": attr_node, "train": train_node}, cycle)
        nodes += [train_node, attr_node, core]
    if cfg.reuse.k and core is not None:
        nodes += _reuse_nodes(cfg, model_node, tokens_node, harvest_node, core, train_params)
    if cfg.interpret.enabled:
        nodes += _interpret_nodes(cfg, nodes)
    return Plan(nodes)


def _interpret_nodes(cfg: Config, nodes: list[Node]) -> list[Node]:
    """The probing data (once per model and layer), an interpret node beside every evaluated SAE, and the
    latent cards' data."""
    by_label = {n.label: n for n in nodes}
    ic = cfg.interpret
    probe_file = Path(ic.probe_data).expanduser() if ic.probe_data else None
    if probe_file is not None and not probe_file.is_file():
        raise UserError(f"interpret.probe_data: {probe_file} not found; give a JSONL file with text and label fields")
    probe_node = stage_node("probes", {"layer": cfg.harvest.layer, **lm_params(cfg), "seed": ic.seed,
                                 "absorption_words": ic.absorption_words, "probe_examples": ic.probe_examples,
                                 "probe_context": ic.probe_context, "offline_tasks": probe_tasks.wiki_version(),
                                 "probe_data": sha256_file(probe_file) if probe_file else None},
                      {"model": by_label["model"], "tokens": by_label["tokens"], "harvest": by_label["harvest"]},
                      args={"batch_size": ic.batch_size,
                            "probe_data_location": str(probe_file.resolve()) if probe_file else None})
    out = [probe_node]
    for ev in [n for n in nodes if n.stage == "evaluate"]:
        out.append(stage_node("interpret", {"probe_k": ic.probe_k}, {"probes": probe_node, "sae": ev.inputs["sae"]},
                        ev.cycle, tag=ev.tag))
    return out + [cards_node(cfg, nodes)]


def cards_node(cfg: Config, nodes: list[Node]) -> Node:
    """The latent cards' data: the final core (in the last cycle's SAE) and a sample of other latents."""
    by_label = {n.label: n for n in nodes}
    last = cfg.cycles - 1
    selections = {f"select{n.cycle}": n for n in nodes if n.stage == "select"}
    ic = cfg.interpret
    return stage_node("latents", {"layer": cfg.harvest.layer, **lm_params(cfg), "seed": ic.seed,
                            "contexts": ic.cards_contexts, "noncore": ic.cards_noncore},
                {"model": by_label["model"], "tokens": by_label["tokens"], "harvest": by_label["harvest"],
                 "train": by_label[f"train[{last}]"], "attribute": by_label[f"attribute[{last}]"], **selections},
                args={"batch_size": ic.batch_size})


def _reuse_nodes(cfg: Config, model_node: Node, tokens_node: Node, harvest_node: Node, core: Node,
                 train_params: dict[str, Any]) -> list[Node]:
    """Reuse SAEs in the arms of `reuse.arms`: distilled, random and none at every k (plus a second seed at the
    reference k), frequency and none_compute at `reuse.control_k` and the run's seed; and their evaluations.
    The controls' nodes come after the others', so the nodes (and keys) of a plan without them are unchanged."""
    arms = cfg.reuse.arms
    cycle_saes = [n for n in ancestors(core) if n.stage == "train"]
    cycle0 = next(n for n in cycle_saes if n.cycle == 0)
    rand = stage_node("random_core", {"seed": cfg.reuse.random_core_seed}, {"cycle0": cycle0, "core": core},
                tag="seed=" + str(cfg.reuse.random_core_seed))
    cores: dict[str, Node | None] = {"distilled": core, "random": rand, "none": None}
    runs = [(k, cfg.seed) for k in cfg.reuse.k]
    consistency_k = cfg.reuse.reference_k(cfg.sae.k)
    # once each: consistency seeds [0, 0] at seed 1 would otherwise plan the seed-0 arms twice
    runs += [(consistency_k, s) for s in dict.fromkeys(cfg.reuse.consistency_seeds[:2]) if s != cfg.seed]
    baseline_node = stage_node("baseline", {"layer": cfg.harvest.layer, **lm_params(cfg, evaluation=True)},
                         {"model": model_node, "tokens": tokens_node, "harvest": harvest_node},
                         args={"batch_size": cfg.evaluation.batch_size})
    nodes = [rand, baseline_node] if "random" in arms else [baseline_node]
    eval_params = {"layer": cfg.harvest.layer, **lm_params(cfg, evaluation=True),
                   "dense_threshold": cfg.evaluation.dense_threshold}
    eval_inputs = {"model": model_node, "tokens": tokens_node, "harvest": harvest_node, "baseline": baseline_node}
    eval_args = {"batch_size": cfg.evaluation.batch_size}
    for n in cycle_saes:
        nodes.append(stage_node("evaluate", eval_params, {**eval_inputs, "sae": n}, n.cycle, args=eval_args,
                          tag=f"cycle={n.cycle}"))

    def arm_nodes(arm: str, k: int, seed: int, arm_core: Node | None, extra: dict[str, Any]) -> list[Node]:
        inputs: dict[str, Node] = {"harvest": harvest_node}
        if arm_core is not None:
            inputs["core"] = arm_core
        tag = f"{arm},k={k},seed={seed}"
        sae = sae_params_for({**cfg.sae.model_dump(), "k": k, "width": cfg.reuse.width or cfg.sae.width},
                             arm_core is not None)
        r = stage_node("reuse", {"arm": arm, "seed": seed, "sae": sae, "train": train_params, **extra}, inputs,
                       tag=tag, args={"checkpoint_every": cfg.train.checkpoint_every})
        return [r, stage_node("evaluate", eval_params, {**eval_inputs, "sae": r}, args=eval_args, tag=tag)]

    for k, seed in runs:
        for arm, arm_core in cores.items():
            if arm in arms:
                nodes += arm_nodes(arm, k, seed, arm_core, {})
    control_k = cfg.reuse.controls_k(cfg.sae.k)
    if "frequency" in arms:
        freq = stage_node("frequency_core", {"layer": cfg.harvest.layer, **lm_params(cfg)},
                          {"model": model_node, "tokens": tokens_node, "harvest": harvest_node,
                           "train": core.inputs["train"], "core": core},
                          args={"batch_size": cfg.attribution.batch_size})
        nodes.append(freq)
        for k in control_k:
            nodes += arm_nodes("frequency", k, cfg.seed, freq, {})
    if "none_compute" in arms:
        # as many SAE training tokens as the distillation: each cycle's training and the reuse SAE's own
        for k in control_k:
            nodes += arm_nodes("none_compute", k, cfg.seed, None, {"trainings": cfg.cycles + 1})
    return nodes


def load_input(store: AnyStore, node: Node, source: Node) -> Artifact:
    """`source`'s artifact as `node` reads it. A harvest in parts comes with its parts attached for the stages
    that read activations; the harvest itself reads only its parts' manifests (their data never moves for it)."""
    if node.stage == "harvest" and source.stage == "harvest_part":
        return Artifact(Path(store.where(source.stage, source.key)), store.manifest(source.stage, source.key))
    art = store.load(source.stage, source.key)
    parts = [p for p in source.inputs.values() if p.stage == "harvest_part"]
    if parts and STAGES[node.stage].READS_ACTIVATIONS:
        return replace(art, parts=tuple(store.load(p.stage, p.key) for p in parts))
    return art


def materialize(store: AnyStore, node: Node, rt: Runtime) -> tuple[Artifact, bool]:
    """Ensure `node`'s artifact exists and is intact; returns it and whether it was computed now.

    Under the key's lock: two processes never compute the same artifact, and the one that waited
    finds it done. A damaged artifact is moved aside and recomputed; a killed computation resumes
    from the checkpoints in its partial folder."""
    def waiting() -> None:
        print(f"dmsae: {node.label} {node.key} is being computed by another process; waiting for it",
              file=sys.stderr, flush=True)

    with store.lock(node.stage, node.key, on_wait=waiting):
        done = store.load_intact(node.stage, node.key)
        if done is not None:
            return done, False
        inputs = {name: load_input(store, node, n) for name, n in node.inputs.items()}
        stage_rt = Runtime(device=rt.device, show_progress=rt.show_progress, on_progress=rt.on_progress,
                           checkpoint_dir=store.open_partial(node.stage, node.key), args=dict(node.args),
                           label=node.label, on_checkpoint=lambda: store.sync_partial(node.stage, node.key))
        start = time.perf_counter()
        try:
            with store.writer(node.stage, node.key) as tmp:
                metrics = STAGES[node.stage].run(tmp, node.params, inputs, stage_rt)
                store.finalize(tmp, key=node.key, stage=node.stage, version=node.version, params=node.params,
                               inputs={k: n.key for k, n in node.inputs.items()},
                               timings={"seconds": time.perf_counter() - start}, metrics=metrics,
                               resumed=stage_rt.resumed)
        except UserError:  # bad input: rerunning the same way cannot help, so keep nothing of it
            store.clear_partial(node.stage, node.key)
            raise
        store.clear_partial(node.stage, node.key)
        return store.load(node.stage, node.key), True


@dataclass(frozen=True)
class ModelHeader:
    num_layers: int | None
    max_positions: int | None
    hidden_size: int | None = None


def _header_from_config(data: dict[str, Any]) -> ModelHeader:
    text = data.get("text_config", data)
    n, ctx, d = text.get("num_hidden_layers"), text.get("max_position_embeddings"), text.get("hidden_size")
    return ModelHeader(*(int(v) if v is not None else None for v in (n, ctx, d)))


def model_header(kind: str, location: str) -> ModelHeader:
    """The model's decoder layers and context length from its config or GGUF header, without loading
    weights. A hub id fetches only its config.json (cached by huggingface_hub), so an id this machine
    cannot reach is refused here rather than after the run has started."""
    if kind == "dir":
        return _header_from_config(json.loads((Path(location) / "config.json").read_text()))
    if kind == "gguf":
        from gguf import GGUFReader

        try:
            fields = GGUFReader(location).fields
            arch = fields["general.architecture"].contents()
            ctx, d = fields.get(f"{arch}.context_length"), fields.get(f"{arch}.embedding_length")
            return ModelHeader(int(fields[f"{arch}.block_count"].contents()),
                               int(ctx.contents()) if ctx is not None else None,
                               int(d.contents()) if d is not None else None)
        except (KeyError, ValueError, OSError):
            raise UserError(f"model.path: {location} has no readable GGUF header; point it at a real .gguf") from None
    try:
        from huggingface_hub import hf_hub_download

        return _header_from_config(json.loads(Path(hf_hub_download(location, "config.json")).read_text()))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated, no config: all one user-facing line
        raise UserError(f"model.path: {location!r} is not a local model and its config could not be fetched from the "
                        f"Hugging Face hub ({type(e).__name__}); check the id and the network, or give a local "
                        "folder or .gguf") from None


def check_sae_memory(cfg: Config, d: int) -> None:
    """An SAE too big for this machine's memory is refused before the harvest, not after it. Training holds
    the encoder and decoder (width x d each), their gradients and Adam's two moments: 8 float32 copies."""
    import psutil

    total = psutil.virtual_memory().total
    for key, width in (("sae.width", cfg.sae.width), ("reuse.width", cfg.reuse.width or cfg.sae.width)):
        need = 8 * 4 * width * d
        if need > total:
            raise UserError(f"{key}={width}: training an SAE of that width on d={d} needs about {need / 2**30:.0f} GiB "
                            f"of memory, more than this machine's {total / 2**30:.0f} GiB; lower {key}")


def check_corpus(kind: str, location: str, cfg: Config) -> None:
    """A corpus that cannot hold the splits is refused before the model is converted. Local corpora are
    bounded by their size in bytes (a token is at least one byte, plus one separator per document); the
    exact count is known only once tokenized, in the tokens stage, which writes nothing when short."""
    d = cfg.data
    needed = sum(-(-n // d.context) * (d.context - 1) for n in (d.train_tokens, d.attribution_tokens, d.eval_tokens))
    if kind == "hub":
        try:
            from huggingface_hub import HfApi

            HfApi().dataset_info(location)
        except Exception as e:  # noqa: BLE001 - as for the model: one line whatever the hub says
            raise UserError(f"data.path: {location!r} is not a local corpus and the Hugging Face hub does not answer "
                            f"for it ({type(e).__name__}); check the id and the network, or give a local "
                            ".txt/.jsonl file") from None
        return
    path = Path(location)
    size = sum(f.stat().st_size for f in path.glob("*.txt")) if kind == "txtdir" else path.stat().st_size
    if size == 0:
        raise UserError(f"data.path: {location} is empty; give a corpus with some text")
    if needed > 2 * size:
        raise UserError(f"data: the splits need about {needed} tokens but the corpus {location} has {size} bytes "
                        "(far fewer tokens); lower data.train_tokens/attribution_tokens/eval_tokens or add documents")


def check_report_dir(report_dir: str) -> None:
    """The report folder must be writable before hours of work end in writing it."""
    try:
        probe_writable(Path(report_dir))
    except OSError as e:
        raise UserError(f"report_dir={report_dir} is not writable ({e.strerror}); set report_dir to a writable "
                        "folder") from None


def preflight(cfg: Config, p: Plan, store: AnyStore) -> None:
    """Checks that need the model or the store, run before any stage so a mistake writes nothing."""
    store.check_format()
    check_report_dir(cfg.report_dir)
    model = p.find("model")
    if store.has("model", model.key):  # converted already: a transformers folder, whatever the source was
        header = model_header("dir", str(store.load("model", model.key, verify=False).path))
    else:
        header = model_header(model.params["kind"], model.args["location"])
    n_layers = header.num_layers
    if n_layers is not None and not 0 <= cfg.harvest.layer < n_layers:
        raise UserError(f"harvest.layer={cfg.harvest.layer} is out of range: the model has layers 0..{n_layers - 1}")
    if header.max_positions is not None and cfg.data.context > header.max_positions:
        raise UserError(f"data.context={cfg.data.context} is longer than the model's context of "
                        f"{header.max_positions} positions; lower data.context")
    if header.hidden_size is not None and cfg.device == "cpu":
        check_sae_memory(cfg, header.hidden_size)
    corpus = p.find("tokens")
    if not store.has("tokens", corpus.key):
        check_corpus(corpus.params["kind"], corpus.args["location"], cfg)
    probes_nodes = p.of_stage("probes")
    if probes_nodes and probes_nodes[0].args["probe_data_location"] and not store.has("probes", probes_nodes[0].key):
        # read the user's task file now rather than after the harvest and the cycles
        probe_tasks.jsonl_task(probes_nodes[0].args["probe_data_location"], max_per_class=cfg.interpret.probe_examples,
                           seed=cfg.interpret.seed)
    final = p.last_core()
    if cfg.reuse.k and store.has(final.stage, final.key):  # else the reuse stage checks it once the core exists
        core_size = store.manifest(final.stage, final.key).metrics["core_size"]
        width = cfg.reuse.width or cfg.sae.width
        if width - core_size < max(cfg.reuse.k):
            raise UserError(f"the distilled core has {core_size} latents, too many for reuse SAEs of width {width} "
                            f"at k={max(cfg.reuse.k)}; raise reuse.width or lower reuse.k")


def run_record(cfg: Config, p: Plan, status: str, parent: str | None = None, created: str = "") -> RunRecord:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return RunRecord(name=cfg.name, config=cfg.model_dump(mode="json"), keys={n.label: n.key for n in p.nodes},
                     stages={n.label: n.stage for n in p.nodes}, parent=parent, status=status,
                     created=created or now, updated=now)


def stage_detail(stage: str, metrics: dict[str, Any]) -> str:
    """The stage's one-line summary of its manifest metrics for `dmsae status` (every stage has `describe`)."""
    return STAGES[stage].describe(metrics)


def referenced(store: AnyStore) -> set[tuple[str, str]]:
    """Every (stage, key) a recorded run references: the keys it recorded and, in case a stage's version changed
    since, the keys its config plans today. What `dmsae gc` keeps."""
    keep: set[tuple[str, str]] = set()
    for r in store.read_runs():
        keep |= {(r.stages.get(label, label.split("[")[0]), key) for label, key in r.keys.items()}
        try:
            keep |= {(n.stage, n.key) for n in plan(Config.model_validate(r.config)).nodes}
        except (UserError, ValueError):  # a config the current code no longer accepts keeps its recorded keys
            pass
    return keep
