"""The core-gate ablation's report: every point's reuse arms compared with no core (and distilled with random)
at equal total L0, absorption and probing beside them, the final cores, and optionally the probing diagnostic
without the core and the noise floor of another seed (`dmsae ablate`, which runs the points: flows/ablate.py).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from dmsae import readers
from dmsae.config import Config
from dmsae.eval.l0match import compare_arms, matched_deltas
from dmsae.eval.overlap import MAX_WIDTH, chance_overlap, dictionary_overlap
from dmsae.eval.probing import pooled_codes, sparse_probing
from dmsae.eval.stats import Interval, bootstrap_ci
from dmsae.plan import Node, Plan
from dmsae.reports.noise_floor import NoiseFloor, noise_floor_markdown
from dmsae.reports.tables import (
    ARM_COLORS,
    INTERPRET_COLUMNS,
    core_overlap,
    interpret_table,
    md_table,
    results_table,
    write_text_atomically,
)
from dmsae.stores import AnyStore


def point_rows(cfg: Config, store: AnyStore, p: Plan) -> pd.DataFrame:
    """The point's reuse SAEs: reconstruction, absorption and probing, tagged with its gate, cap and seed."""
    table = results_table(store, p)
    interp = interpret_table(store, p, table)
    if not interp.empty:  # absorption and probing beside each SAE's reconstruction metrics
        table = table.merge(interp[["sae", *INTERPRET_COLUMNS]], on="sae", how="left")
    table = table[table.arm != "cycle"].copy()
    table["gate"], table["cap"], table["point_seed"] = cfg.sae.core_gate, cap_label(cfg), cfg.seed
    return table


def cap_label(cfg: Config) -> str:
    """The point's core cap as its name and the tables spell it: 'none' or the max_core value."""
    return "none" if cfg.selection.max_core is None else str(cfg.selection.max_core)


def core_facts(cfg: Config, store: AnyStore, p: Plan) -> dict[str, Any]:
    """The final core: size, whether the cap bit, the attribution it explains, cycle-to-cycle Jaccard."""
    final = p.last_core()
    if not store.has("select", final.key):
        return {}
    m = store.manifest("select", final.key).metrics
    overlap = core_overlap(store, p)
    return {"gate": cfg.sae.core_gate, "cap": cap_label(cfg), "seed": cfg.seed, "core_size": m["core_size"],
            "cap_bit_cycles": sum(bool(store.manifest("select", n.key).metrics.get("cap_bit"))
                                  for n in p.of_stage("select") if store.has("select", n.key)),
            "explained_fraction": m.get("explained_fraction", math.nan),
            "cycle_jaccard": float(overlap.jaccard.mean()) if len(overlap) else math.nan,
            "core_encoder": store.load("select", final.key).file(readers.CORE_FILE)}


def cross_seed_match(a: Path, b: Path, threshold: float = 0.9) -> tuple[float, float]:
    """Between two whole distillations' final cores (lineage ids do not carry across seeds): the mean over
    both cores' latents of the best encoder-direction cosine in the other core, and the fraction above
    `threshold`."""
    ea, eb = (torch.nn.functional.normalize(load_file(str(f))["encoder"].double().T, dim=1) for f in (a, b))
    if not ea.shape[0] or not eb.shape[0]:
        return math.nan, math.nan
    sim = ea @ eb.T
    best = torch.cat([sim.max(dim=1).values, sim.max(dim=0).values])
    return float(best.mean()), float((best > threshold).double().mean())


def interval(values: pd.Series | np.ndarray) -> Interval:
    """The paired bootstrap interval of the mean of per-seed differences (dmsae.eval.stats)."""
    return bootstrap_ci(np.asarray(values, dtype=float))


def with_intervals(d: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    """Per group of `by`: the seeds, and for each column of per-seed differences its mean, sd, the bounds of its
    95% bootstrap interval (`_lo`, `_hi`) and the decision in words (`_decision`)."""
    out = []
    for key, g in d.groupby(by, sort=True):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        row["seeds"] = int(g.seed.nunique())
        for c in columns:
            ci = interval(g[c])
            row |= {c: ci.mean, f"{c}_sd": float(g[c].std()), f"{c}_lo": ci.low, f"{c}_hi": ci.high,
                    f"{c}_decision": ci.decision}
        out.append(row)
    return pd.DataFrame(out)


def ci_text(mean: float, low: float, high: float, fmt: str = "{:+.4f}") -> str:
    """'mean [low, high]' (the mean alone when there is no interval)."""
    if pd.isna(mean):
        return ""
    return fmt.format(mean) + ("" if pd.isna(low) else f" [{fmt.format(low)}, {fmt.format(high)}]")


def summarise(rows: pd.DataFrame, k_values: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per gate, cap, arm and k: the L0-matched differences over seeds, with bootstrap intervals; per gate and
    cap: the score over the low-L0 half of the k grid that picks the default, with its interval)."""
    deltas = []
    for (gate, cap), g in rows.groupby(["gate", "cap"], sort=True):
        vs_none = matched_deltas(g)
        vs_random = matched_deltas(g[g.arm.isin(["distilled", "random"])], reference="random")
        if vs_none.empty:
            continue
        vs_none = vs_none.merge(vs_random[["arm", "k", "seed", "d_ce_loss_score"]].rename(
            columns={"d_ce_loss_score": "d_ce_vs_random"}), on=["arm", "k", "seed"], how="left")
        # at equal k too: the random core's L0 rarely overlaps the distilled one's, and a win with no more L0
        # is a win at equal L0 whenever the score rises with L0
        rand = g[g.arm == "random"][["k", "seed", "ce_loss_score", "l0"]].rename(
            columns={"ce_loss_score": "random_ce", "l0": "random_l0"})
        vs_none = vs_none.merge(rand, on=["k", "seed"], how="left")
        distilled = vs_none.arm == "distilled"
        vs_none["d_ce_vs_random_same_k"] = (vs_none.ce_loss_score - vs_none.random_ce).where(distilled)
        vs_none["d_l0_vs_random_same_k"] = (vs_none.l0 - vs_none.random_l0).where(distilled)
        vs_none["gate"], vs_none["cap"] = gate, cap
        deltas.append(vs_none)
    if not deltas:
        return pd.DataFrame(), pd.DataFrame()
    d = pd.concat(deltas, ignore_index=True).rename(columns={"d_ce_loss_score": "d_ce_vs_none",
                                                             "d_explained_variance": "d_ev_vs_none"})
    by = ["gate", "cap", "arm", "k"]
    agg = with_intervals(d, by, ["d_ce_vs_none", "d_ev_vs_none", "d_ce_vs_random", "d_ce_vs_random_same_k"])
    means = d.groupby(by, sort=True).agg(l0=("l0", "mean"), ce_loss_score=("ce_loss_score", "mean"),
                                         d_l0_vs_random_same_k=("d_l0_vs_random_same_k", "mean"),
                                         extrapolated=("extrapolated", "sum")).reset_index()
    agg = means.merge(agg, on=by)
    low = sorted(k_values)[: math.ceil(len(k_values) / 2)]
    dist = d[(d.arm == "distilled") & d.k.isin(low)]
    per_seed = dist.groupby(["gate", "cap", "seed"]).d_ce_vs_none.mean().reset_index()
    pick = with_intervals(per_seed.rename(columns={"d_ce_vs_none": "low_l0_d_ce_vs_none"}), ["gate", "cap"],
                          ["low_l0_d_ce_vs_none"])
    pick = pick.rename(columns={"low_l0_d_ce_vs_none_sd": "sd", "low_l0_d_ce_vs_none_decision": "decision"})
    pick["low_k"] = ",".join(map(str, low))
    return agg, pick.sort_values("low_l0_d_ce_vs_none", ascending=False, ignore_index=True)


# distilled against each control, and the compute-matched no core against the plain one
COMPARISONS = (("distilled", "none"), ("distilled", "none_compute"), ("distilled", "frequency"),
               ("distilled", "random"), ("none_compute", "none"))


def control_deltas(rows: pd.DataFrame) -> pd.DataFrame:
    """Per gate, cap, comparison (`a - b`), k and seed: the difference at equal L0 (`compare_arms`: the arm with
    more k values is read at the other's L0) and at equal k, in CE-loss score and explained variance."""
    out = []
    for (gate, cap), g in rows.groupby(["gate", "cap"], sort=True):
        for a, b in COMPARISONS:
            d = compare_arms(g, a, b)
            if not d.empty:
                out.append(d.assign(gate=gate, cap=cap, comparison=f"{a} - {b}"))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def controls_table(deltas: pd.DataFrame) -> pd.DataFrame:
    """`control_deltas` over seeds: mean and 95% bootstrap interval of each difference, and the decision."""
    if deltas.empty:
        return deltas
    cols = ["d_ce_loss_score", "d_explained_variance", "d_ce_loss_score_same_k"]
    t = with_intervals(deltas, ["gate", "cap", "comparison", "k"], cols)
    extra = deltas.groupby(["gate", "cap", "comparison", "k"], sort=True).agg(
        l0=("l0", "mean"), curve=("curve", "first"), extrapolated=("extrapolated", "sum")).reset_index()
    t = t.merge(extra, on=["gate", "cap", "comparison", "k"])
    order = {f"{a} - {b}": i for i, (a, b) in enumerate(COMPARISONS)}
    return t.sort_values(["gate", "cap", "comparison", "k"], key=lambda c: c.map(order) if c.name == "comparison"
                         else c, ignore_index=True)


def readable_controls(t: pd.DataFrame) -> pd.DataFrame:
    """`controls_table` for markdown: each difference as 'mean [low, high]' with its decision."""
    out = t[["gate", "cap", "comparison", "k", "seeds", "l0"]].copy()
    out["read on"] = t.curve
    for col, name in (("d_ce_loss_score", "d CE-loss score"), ("d_explained_variance", "d explained variance"),
                      ("d_ce_loss_score_same_k", "d CE-loss score, same k")):
        out[name] = [ci_text(m, lo, hi) for m, lo, hi in zip(t[col], t[f"{col}_lo"], t[f"{col}_hi"], strict=True)]
        if col == "d_ce_loss_score":
            out["CE decision"] = t[f"{col}_decision"]
    out["extrapolated"] = t.extrapolated
    return out


def probing_without_core(cfg: Config, store: AnyStore, p: Plan, ks: tuple[int, ...] = (1, 5)) -> pd.DataFrame:
    """A diagnostic for cored reuse SAEs: the interpret stage's k-sparse probes (every latent a candidate,
    ranked by class-mean difference) against the same probes with the core left out, and the share of
    the chosen latents that are core latents. Frequent latents have large mean differences, so a core of them can
    crowd the chosen set; this says whether a probing deficit is the core's or the rest of the dictionary's."""
    rows = []
    for n in p.of_stage("interpret"):
        sae_node = n.inputs["sae"]
        if sae_node.stage != "reuse" or not store.has(n.stage, n.key):
            continue
        sae, scale = readers.load_sae(store.load(sae_node.stage, sae_node.key))
        core = sae.core_size
        if not core:
            continue
        probes = store.load("probes", n.inputs["probes"].key)
        data = readers.probe_data(probes)
        # every latent a candidate: the stage's own table; only the probes without the core are new
        every_table = pd.read_parquet(store.load(n.stage, n.key).file(readers.SPARSE_PROBING_FILE))
        noncore_table = sparse_probing(pooled_codes(sae, scale, data), readers.probe_tasks(probes), ks,
                                       skip_latents=core)
        for k in ks:
            every, noncore = every_table[every_table.k == k], noncore_table[noncore_table.k == k]
            if every.empty:  # k not among the stage's probe_k, or above the dictionary's width
                continue
            rows.append({"gate": cfg.sae.core_gate, "cap": cap_label(cfg), "seed": sae_node.params["seed"],
                         "arm": sae_node.params["arm"], "k": sae.k, "probe_k": k,
                         "core_share_of_chosen": sum(i < core for lat in every.latents for i in lat) / (k * len(every)),
                         "accuracy_all_latents": every.test_accuracy.mean(),
                         "accuracy_without_core": noncore.test_accuracy.mean()})
    return pd.DataFrame(rows)


FEATURE_METRICS = ("absorption_fraction", "absorption_rate", "sparse_probe_k1", "sparse_probe_k5")


def summarise_features(rows: pd.DataFrame) -> pd.DataFrame:
    """Absorption and sparse probing per gate, cap, arm and k: each arm's value and, for the cored arms, the
    value minus the no-core arm's curve read at the same total L0 (same seed); mean and sd over seeds."""
    if not set(FEATURE_METRICS) <= set(rows.columns):
        return pd.DataFrame()
    out = []
    for (gate, cap), g in rows.groupby(["gate", "cap"], sort=True):
        d = matched_deltas(g, metrics=FEATURE_METRICS)
        values = g[["arm", "k", "seed", "l0", *FEATURE_METRICS]]
        if not d.empty:
            values = values.merge(d[["arm", "k", "seed", *(f"d_{m}" for m in FEATURE_METRICS)]],
                                  on=["arm", "k", "seed"], how="left")
        values = values.assign(gate=gate, cap=cap)
        out.append(values)
    v = pd.concat(out, ignore_index=True)
    cols = [c for c in v.columns if c in FEATURE_METRICS or c.startswith("d_")]
    agg = v.groupby(["gate", "cap", "arm", "k"], sort=True).agg(
        seeds=("seed", "nunique"), l0=("l0", "mean"),
        **{f"{c}_mean": (c, "mean") for c in cols}, **{f"{c}_sd": (c, "std") for c in cols}).reset_index()
    table = agg[["gate", "cap", "arm", "k", "seeds", "l0"]].copy()
    for c in cols:
        if c.startswith("d_"):  # a difference: its bootstrap interval over seeds
            cis = [interval(g[c]) for _, g in v.groupby(["gate", "cap", "arm", "k"], sort=True)]
            table[c] = [ci.text("{:+.3f}") for ci in cis]
        else:
            table[c] = [("" if pd.isna(m) else f"{m:.3f}" + ("" if pd.isna(s) else f" ± {s:.3f}"))
                        for m, s in zip(agg[f"{c}_mean"], agg[f"{c}_sd"], strict=True)]
    return table


def pm(mean: float, sd: float) -> str:
    """'mean ± sd' (sd over seeds; a lone seed has none)."""
    if pd.isna(mean):
        return ""
    return f"{mean:+.4f}" + ("" if pd.isna(sd) else f" ± {sd:.4f}")


def readable(agg: pd.DataFrame) -> pd.DataFrame:
    """The per-k table for markdown: each difference as 'mean [low, high]', its 95% bootstrap interval over seeds."""
    out = agg[["gate", "cap", "arm", "k", "seeds", "l0", "ce_loss_score"]].copy()
    for col in ("d_ce_vs_none", "d_ev_vs_none", "d_ce_vs_random", "d_ce_vs_random_same_k"):
        out[col] = [ci_text(m, lo, hi) for m, lo, hi in zip(agg[col], agg[f"{col}_lo"], agg[f"{col}_hi"], strict=True)]
    out["d_ce_vs_none_decision"] = agg.d_ce_vs_none_decision
    out["d_l0_vs_random_same_k"] = agg.d_l0_vs_random_same_k
    out["extrapolated"] = agg.extrapolated
    return out


def plot_ablation(rows: pd.DataFrame, path: Path,
                  metrics: tuple[str, ...] = ("ce_loss_score", "explained_variance"),
                  title: str = "Core gates: each arm over its measured L0 (one line per seed)") -> None:
    """One column per (gate, cap), one row per metric: each arm over its measured L0, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({(g, c) for g, c in zip(rows.gate, rows.cap, strict=True)})
    colors = ARM_COLORS
    fig, axes = plt.subplots(len(metrics), len(variants), figsize=(4 * len(variants), 3.5 * len(metrics)),
                             squeeze=False)
    for j, (gate, cap) in enumerate(variants):
        g = rows[(rows.gate == gate) & (rows.cap == cap)]
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            for arm, color in colors.items():
                for seed, s in g[g.arm == arm].groupby("seed"):
                    s = s.sort_values("l0")
                    ax.plot(s.l0, s[metric], marker="o", ms=3, color=color, alpha=0.7,
                            label=arm if seed == g.seed.min() else None)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("total L0 (eval tokens)")
            ax.set_title(f"{gate}, cap {cap}" if i == 0 else "")
            ax.set_ylabel(metric.replace("_", " "))
        axes[0][j].legend(fontsize=7)
    # one variant makes a narrow figure: wrap the title to its width instead of cutting it off
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_controls(controls: pd.DataFrame, path: Path, metric: str = "d_ce_loss_score") -> int:
    """A forest plot of `controls_table`: one panel per (gate, cap), one line per comparison and k, the mean over
    seeds as a dot and its 95% bootstrap interval as a bar, 0 marked. Returns how many intervals it drew (a
    single seed or a comparison without a reading has a dot or nothing, no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = sorted({(g, c) for g, c in zip(controls.gate, controls.cap, strict=True)})
    n_lines = max(len(controls[(controls.gate == g) & (controls.cap == c)]) for g, c in variants)
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 1.4 + 0.32 * n_lines), squeeze=False)
    drawn = 0
    for ax, (gate, cap) in zip(axes[0], variants, strict=True):
        t = controls[(controls.gate == gate) & (controls.cap == cap)].reset_index(drop=True)
        y = np.arange(len(t))[::-1]
        for yi, (_, r) in zip(y, t.iterrows(), strict=True):
            color = ARM_COLORS.get(r.comparison.split(" - ")[1], "black")
            lo, hi = r[f"{metric}_lo"], r[f"{metric}_hi"]
            if np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [yi, yi], color=color, lw=2)
                drawn += 1
            if np.isfinite(r[metric]):
                ax.plot(r[metric], yi, "o", color=color)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(y, [f"{c}, k={k}" for c, k in zip(t.comparison, t.k, strict=True)], fontsize=8)
        what = {"d_ce_loss_score": "CE-loss score", "d_explained_variance": "explained variance"}.get(metric, metric)
        ax.set_xlabel(f"difference in {what} at equal L0 (mean over seeds, 95% bootstrap interval)", fontsize=8)
        ax.set_title(f"gate {gate}, cap {cap}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def cross_seed_rows(facts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per gate and cap, `cross_seed_match` averaged over every pair of seeds' final cores."""
    rows = []
    for (gate, cap), g in pd.DataFrame(facts).groupby(["gate", "cap"]):
        files = list(g.sort_values("seed").core_encoder)
        pairs = [cross_seed_match(files[i], files[j]) for i in range(len(files)) for j in range(i + 1, len(files))]
        if pairs:
            rows.append({"gate": gate, "cap": cap, "pairs": len(pairs),
                         "mean_best_cosine": float(np.mean([a for a, _ in pairs])),
                         "matched_above_0.9": float(np.mean([b for _, b in pairs]))})
    return rows


OVERLAP_MAX_WIDTH = MAX_WIDTH  # whole dictionaries wider than this are not matched (the Hungarian algorithm is cubic)
DISTILLED_SET, TOPC_SET = "distilled core", "top-c by attribution, cycle 0"
FREQUENCY_SET, WHOLE_SET = "frequency core", "whole dictionary, cycle 0"


def overlap_sets(store: AnyStore, p: Plan) -> dict[str, tuple[Node, tuple[int, ...] | None]]:
    """The latent sets of a finished point that are compared across seeds: name -> (the SAE they belong to, their
    indices in it, None for all). Cycle 0 is a no-core SAE of the seed; its top c by attribution (c: the final
    core's size) is what one attribution without distillation would pick."""
    final = p.last_core()
    core = tuple(readers.core(store.load("select", final.key, verify=False))["indices"].tolist())
    first = p.find("select", 0)
    order = readers.core(store.load("select", first.key, verify=False))["order"].tolist()
    sets: dict[str, tuple[Node, tuple[int, ...] | None]] = {
        DISTILLED_SET: (final.inputs["train"], core), TOPC_SET: (first.inputs["train"], tuple(order[:len(core)]))}
    for n in p.of_stage("frequency_core"):
        if store.has(n.stage, n.key):
            idx = readers.core(store.load(n.stage, n.key))["indices"].tolist()
            sets[FREQUENCY_SET] = (n.inputs["train"], tuple(idx))
    sets[WHOLE_SET] = (first.inputs["train"], None)
    return sets


def cross_seed_overlap(done: list[tuple[Config, Plan]], store: AnyStore) -> pd.DataFrame:
    """Per gate, cap, latent set and pair of seeds: the shared latents of Paulo & Belrose (dmsae.eval.overlap) and
    the chance level for the same sizes (random unit vectors in the residual's dimension)."""
    cache: dict[tuple[str, ...], object] = {}

    def directions(node: Node, idx: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if ("sae", node.key) not in cache:
            t = readers.sae_tensors(store.load(node.stage, node.key, verify=False))
            cache[("sae", node.key)] = (t["W_enc"].T, t["W_dec"])
        enc, dec = cache[("sae", node.key)]  # type: ignore[misc]
        return (enc, dec) if idx is None else (enc[list(idx)], dec[list(idx)])

    rows = []
    by_variant: dict[tuple[str, str], list[tuple[int, dict[str, tuple[Node, tuple[int, ...] | None]]]]] = {}
    for cfg, p in done:
        by_variant.setdefault((cfg.sae.core_gate, cap_label(cfg)), []).append((cfg.seed, overlap_sets(store, p)))
    for (gate, cap), seeds in sorted(by_variant.items()):
        seeds.sort(key=lambda x: x[0])
        for i in range(len(seeds)):
            for j in range(i + 1, len(seeds)):
                (sa, a), (sb, b) = seeds[i], seeds[j]
                for name in [n for n in a if n in b]:
                    (na, ia), (nb, ib) = a[name], b[name]
                    ea, da = directions(na, ia)
                    eb, db = directions(nb, ib)
                    if ia is None and max(ea.shape[0], eb.shape[0]) > OVERLAP_MAX_WIDTH:
                        continue
                    key = ("overlap", na.key, nb.key, str(ia), str(ib))
                    if key not in cache:
                        cache[key] = dictionary_overlap(ea, da, eb, db)
                    o = cache[key]
                    sizes = ("chance", str(ea.shape[0]), str(eb.shape[0]), str(ea.shape[1]))
                    if sizes not in cache:  # one draw of a whole dictionary is already an average over latents
                        cache[sizes] = chance_overlap(ea.shape[0], eb.shape[0], ea.shape[1],
                                                      draws=1 if ia is None else 5)
                    rows.append({"gate": gate, "cap": cap, "set": name, "seeds": f"{sa},{sb}", "size_a": o.n_a,
                                 "size_b": o.n_b, "shared": o.shared, "shared_fraction": o.fraction,
                                 "mean_encoder_cosine": o.mean_encoder_cosine,
                                 "mean_decoder_cosine": o.mean_decoder_cosine, "chance": cache[sizes]})
    return pd.DataFrame(rows)


def overlap_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """`cross_seed_overlap` per gate, cap and set: the mean over pairs of seeds."""
    if pairs.empty:
        return pairs
    order = {DISTILLED_SET: 0, TOPC_SET: 1, FREQUENCY_SET: 2, WHOLE_SET: 3}
    return pairs.groupby(["gate", "cap", "set"], sort=False).agg(
        pairs=("seeds", "count"), size=("size_a", "mean"), shared_fraction=("shared_fraction", "mean"),
        chance=("chance", "mean"), mean_encoder_cosine=("mean_encoder_cosine", "mean"),
        mean_decoder_cosine=("mean_decoder_cosine", "mean")).reset_index().sort_values(
        ["gate", "cap", "set"], key=lambda c: c.map(order) if c.name == "set" else c, ignore_index=True)


def summarise_diagnostic(diag: pd.DataFrame) -> pd.DataFrame:
    """`probing_without_core` rows as mean ± sd over seeds per gate, cap, arm, k and probe k, with the gain."""
    cols = ["core_share_of_chosen", "accuracy_all_latents", "accuracy_without_core"]
    g = diag.assign(gain=diag.accuracy_without_core - diag.accuracy_all_latents).groupby(
        ["gate", "cap", "arm", "k", "probe_k"], sort=True)
    table = g.seed.nunique().rename("seeds").reset_index()
    for c in cols:
        table[c] = [f"{m:.3f}" + ("" if pd.isna(sd) else f" ± {sd:.3f}")
                    for m, sd in zip(g[c].mean(), g[c].std(), strict=True)]
    table["gain"] = [interval(part.gain).text("{:+.3f}") for _, part in g]
    return table


def write_ablation_report(points: Sequence[tuple[Config, Plan]], store: AnyStore, out_dir: Path, command: str,
                          timings: dict[str, float], probe_diagnostic: bool = False,
                          noise: NoiseFloor | None = None) -> Path:
    """<out_dir>/ablation.md (with `command` to reproduce it), ablation.parquet, ablation_matched.csv and the
    plots, from the points finished in the store; `timings`: wall seconds per point run by this invocation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables, facts, pending, diagnostics, done = [], [], [], [], []
    for cfg, p in points:
        if not all(store.has(n.stage, n.key) for n in p.nodes):  # a point counts once all of it is done
            pending.append(cfg.name)
            continue
        done.append((cfg, p))
        tables.append(point_rows(cfg, store, p))
        facts.append(core_facts(cfg, store, p))
        if probe_diagnostic:
            diagnostics.append(probing_without_core(cfg, store, p))
    parts = ["# Core-gate ablation", "", f"Reproduce: `{command}`", ""]
    if pending:
        parts += [f"Not finished yet ({len(pending)} of {len(points)} points): "
                  + ", ".join(f"`{n}`" for n in pending), ""]
    if not tables:
        parts.append("No point has finished yet.")
    else:
        rows = pd.concat(tables, ignore_index=True)
        rows["seed"] = rows["point_seed"]
        rows.drop(columns=["point_seed"]).to_parquet(out_dir / "ablation.parquet", index=False)
        k_values = sorted(rows.k.unique().tolist())
        agg, pick = summarise(rows, k_values)
        shown = pick[["gate", "cap", "seeds", "low_k"]].assign(
            low_l0_d_ce_vs_none=[ci_text(m, lo, hi) for m, lo, hi in zip(
                pick.low_l0_d_ce_vs_none, pick.low_l0_d_ce_vs_none_lo, pick.low_l0_d_ce_vs_none_hi, strict=True)],
            sd=pick.sd, decision=pick.decision)
        controls = controls_table(control_deltas(rows))
        parts += ["## The decision: distilled minus no core, CE-loss score at equal L0, low-L0 half of the grid", "",
                  "Mean over seeds of each seed's mean over the low k, its 95% bootstrap interval over seeds "
                  "[low, high] (the seeds resampled, each seed's arms kept together: dmsae/eval/stats.py) and the "
                  "decision; the first row is the best variant.", "", md_table(shown, "{:.4f}"), ""]
        if not controls.empty:
            controls.to_csv(out_dir / "controls.csv", index=False)
            parts += ["## The controls: distilled minus each control at equal L0, per k", "",
                      "`a - b` at equal total L0 within each seed, then over seeds: the mean and its 95% bootstrap "
                      "interval, and whether the interval excludes 0. The arm with more k values is the curve read "
                      "at the other's measured L0 (`read on`): a control trained at one k (`frequency`: the most "
                      "often firing latents of the same SAE, as many as the distilled core; `none_compute`: no core, "
                      "as many training tokens as the whole distillation) is compared with the distilled curve read "
                      "at its L0. `same k`: the plain difference at the same k. Empty where the curves do not "
                      "overlap.", "", md_table(readable_controls(controls), "{:.2f}"), "",
                      "![The controls: differences at equal L0 with their intervals](controls.png)", ""]
            plot_controls(controls, out_dir / "controls.png")
        parts += ["## Per k: L0-matched differences (mean and 95% bootstrap interval over seeds)", "",
                  "`d_ce_vs_none`: CE-loss score minus the no-core arm's read at the same total L0 (same seed), with "
                  "its decision; `d_ev_vs_none`: the same for explained variance; `d_ce_vs_random`: distilled minus "
                  "the random core's curve at the same L0 (empty where the curves do not overlap); "
                  "`d_ce_vs_random_same_k`, `d_l0_vs_random_same_k`: distilled minus random at the same k, in score "
                  "and in L0 (mean). `extrapolated`: readings up to 15% past the reference curve's ends.",
                  "", md_table(readable(agg), "{:.3f}"), ""]
        if noise is not None:
            parts += noise_floor_markdown(noise)
            if not noise.table.empty:
                noise.table.to_csv(out_dir / "noise_floor.csv", index=False)
        f = pd.DataFrame([{k: v for k, v in x.items() if k != "core_encoder"} for x in facts])
        match_rows = cross_seed_rows(facts)
        features = summarise_features(rows)
        if not features.empty:
            parts += ["## Absorption and sparse probing (mean ± sd over seeds)", "",
                      "Lower absorption is better, higher probing accuracy is better. `d_*`: the cored arm minus the "
                      "no-core arm's curve read at the same total L0 (same seed); empty where the curves do not "
                      "overlap. Definitions: docs/design.md, section 6.", "", md_table(features), "",
                      "![Absorption and sparse probing against L0](features.png)", ""]
            plot_ablation(rows, out_dir / "features.png", FEATURE_METRICS,
                          "Absorption and sparse probing: each arm over its measured L0 (one line per seed)")
        diag = pd.concat(diagnostics, ignore_index=True) if diagnostics else pd.DataFrame()
        if not diag.empty:
            diag.to_csv(out_dir / "probe_without_core.csv", index=False)
            parts += ["## Sparse probing without the core (diagnostic)", "",
                      "Cored reuse SAEs: the k-sparse probes as above (every latent a candidate), the share of the "
                      "chosen latents that are core latents, and the same probes with the core left out of the "
                      "candidates; `gain` is the second accuracy minus the first (mean ± sd over seeds).", "",
                      md_table(summarise_diagnostic(diag)), ""]
        parts += ["## The final cores", "", "Per point: the final core's size, cycles where the cap bit, the share "
                  "of the last attribution it explains, and the mean Jaccard of consecutive cycles' cores.", "",
                  md_table(f.sort_values(["gate", "cap", "seed"]), "{:.3f}"), "",
                  "Between whole distillations from different seeds (lineage ids do not carry across seeds, so "
                  "encoder directions are matched): mean best cosine, and the share of latents matched above 0.9.",
                  "", md_table(pd.DataFrame(match_rows), "{:.3f}"), ""]
        overlap = cross_seed_overlap(done, store)
        if not overlap.empty:
            overlap.to_csv(out_dir / "overlap.csv", index=False)
            parts += ["## Cross-seed overlap (Paulo & Belrose 2025)", "",
                      "Encoders and decoders of two seeds matched one to one (Hungarian, on cosine similarity); a "
                      "latent is shared when both matchings pair it with the same latent and both cosines are at "
                      "least 0.7; `shared_fraction` is over min(size_a, size_b), averaged over pairs of seeds. "
                      "`chance`: the same count for random unit vectors of the same sizes and dimension. "
                      f"`{TOPC_SET}`: the top c latents by attribution of the seed's no-core cycle-0 SAE, c the "
                      "final core's size: if the distilled cores share more than these, distillation adds "
                      "stability beyond picking high-impact latents once. Whole dictionaries wider than "
                      f"{OVERLAP_MAX_WIDTH} are not matched.", "", md_table(overlap_summary(overlap), "{:.3f}"), ""]
        parts += ["## Raw points", "", md_table(rows[["gate", "cap", "seed", "arm", "k", "core_size", "l0",
                                                       "l0_noncore", "explained_variance", "ce_loss_score",
                                                       "dead_fraction"]].sort_values(["gate", "cap", "seed", "arm",
                                                                                       "k"]), "{:.4f}"), "",
                  "![CE-loss score and explained variance against L0](ablation.png)", ""]
        plot_ablation(rows, out_dir / "ablation.png")
        if not agg.empty:
            agg.to_csv(out_dir / "ablation_matched.csv", index=False)
    if timings:
        parts += ["## Wall time per point (this invocation)", ""]
        parts += [f"- `{n}`: {s:.0f} s" for n, s in timings.items()]
    return write_text_atomically(out_dir / "ablation.md", "\n".join(parts) + "\n")


