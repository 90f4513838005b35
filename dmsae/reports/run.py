"""The report of one run: the metrics table, consistency measures, plots and a markdown summary.

Everything here reads finished artifacts through the store; nothing is recomputed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from dmsae import readers  # noqa: E402
from dmsae.config import Config  # noqa: E402
from dmsae.eval.l0match import compare_arms, matched_deltas  # noqa: E402
from dmsae.eval.overlap import MAX_WIDTH, chance_overlap, dictionary_overlap  # noqa: E402
from dmsae.eval.reconstruction import mean_best_cosine  # noqa: E402
from dmsae.plan import Node, Plan  # noqa: E402
from dmsae.reports.tables import (  # noqa: E402
    ARM_COLORS,
    ARM_LABELS,
    core_overlap,
    interpret_table,
    md_table,
    results_table,
)
from dmsae.store import Artifact  # noqa: E402
from dmsae.stores import AnyStore


def core_decoder_cosines(store: AnyStore, p: Plan, cfg: Config) -> pd.DataFrame:
    """Transfer across sparsity, latent by latent: the final core's encoder rows are frozen in every distilled
    reuse SAE, but each trains its own decoder. One row per (core latent, reuse k): the cosine of its decoder
    row with its row in the SAE at the reference k (sae.k if reused, else the middle k). `latent` is its index
    in the last cycle's SAE, as on its card."""
    saes = {n.params["sae"]["k"]: n for n in p.of_stage("reuse")
            if n.params["arm"] == "distilled" and n.params["seed"] == cfg.seed and store.has(n.stage, n.key)}
    final = p.last_core()
    if len(saes) < 2 or not store.has(final.stage, final.key):
        return pd.DataFrame()
    ks = sorted(saes)
    ref_k = cfg.sae.k if cfg.sae.k in saes else ks[len(ks) // 2]
    # the reuse SAEs hold the final core first, in selection order
    latents = readers.core(store.load(final.stage, final.key))["indices"].tolist()

    def core_decoder(node: Node) -> torch.Tensor:
        art = store.load(node.stage, node.key)
        return readers.sae_tensors(art)["W_dec"][: art.metrics["core_size"]].double()

    ref = core_decoder(saes[ref_k])
    rows = []
    for k in ks:
        cos = torch.nn.functional.cosine_similarity(core_decoder(saes[k]), ref, dim=1)
        rows += [{"latent": latent, "k": k, "reference_k": ref_k, "cosine": float(c)}
                 for latent, c in zip(latents, cos.tolist(), strict=True)]
    return pd.DataFrame(rows)


def summarise_cosines(per_latent: pd.DataFrame) -> pd.DataFrame:
    """Per reuse k, the core decoders' cosines to the reference k: mean, min and the share above 0.9."""
    if per_latent.empty:
        return per_latent
    return per_latent.groupby(["k", "reference_k"]).cosine.agg(
        core_size="count", mean_cosine="mean", min_cosine="min",
        **{"share_above_0.9": lambda c: float((c > 0.9).mean())}).reset_index()


def core_decoder_stability(store: AnyStore, p: Plan, cfg: Config) -> pd.DataFrame:
    """`summarise_cosines` of `core_decoder_cosines`."""
    return summarise_cosines(core_decoder_cosines(store, p, cfg))


def seed_consistency(store: AnyStore, p: Plan, cfg: Config) -> pd.DataFrame:
    """Per arm, the mean best decoder-cosine match between the two consistency seeds' SAEs."""
    by_arm: dict[str, list[Node]] = {}
    for n in p.of_stage("reuse"):
        if n.params["seed"] in cfg.reuse.consistency_seeds[:2] and store.has("reuse", n.key):
            by_arm.setdefault(n.params["arm"], []).append(n)
    rows = []
    for arm, nodes in by_arm.items():
        ks = {n.params["sae"]["k"] for n in nodes if n.params["seed"] != cfg.seed}
        pair = [n for n in nodes if n.params["sae"]["k"] in ks]
        if len(pair) != 2:
            continue
        saes = [readers.sae_tensors(store.load("reuse", n.key, verify=False)) for n in pair]
        width, d = saes[0]["W_dec"].shape
        shared = chance = float("nan")  # wider dictionaries are not matched (MAX_WIDTH)
        if width <= MAX_WIDTH:
            shared = dictionary_overlap(saes[0]["W_enc"].T, saes[0]["W_dec"], saes[1]["W_enc"].T,
                                        saes[1]["W_dec"]).fraction
            chance = chance_overlap(width, width, d, draws=1)
        rows.append({"arm": arm, "k": pair[0].params["sae"]["k"], "seeds": f"{pair[0].params['seed']},"
                     f"{pair[1].params['seed']}",
                     "mean_best_cosine": mean_best_cosine(saes[0]["W_dec"], saes[1]["W_dec"]),
                     "shared_fraction": shared, "chance": chance})
    return pd.DataFrame(rows)


CONTROL_COMPARISONS = (("distilled", "frequency"), ("distilled", "none_compute"), ("distilled", "random"),
                       ("none_compute", "none"))


def controls_table(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The distilled arm against each control at equal total L0 for one seed (`compare_arms`: a control trained at
    one k is compared with the distilled curve read at its L0), and the compute-matched no core against no core."""
    arms = table[(table.arm != "cycle") & (table.seed == seed)]
    out = []
    for a, b in CONTROL_COMPARISONS:
        d = compare_arms(arms, a, b)
        if not d.empty:
            out.append(d.assign(comparison=f"{a} - {b}"))
    if not out:
        return pd.DataFrame()
    d = pd.concat(out, ignore_index=True)
    return d[["comparison", "k", "l0", "curve", "d_ce_loss_score", "d_explained_variance", "d_ce_loss_score_same_k",
              "extrapolated"]]


def cycle_table(store: AnyStore, p: Plan) -> pd.DataFrame:
    """Per finished cycle: the core it started with, its FVUs and L0, and the core it selected."""
    rows = []
    for n in p.of_stage("select"):
        if not store.has("select", n.key):
            continue
        tr = store.manifest("train", n.inputs["train"].key).metrics
        at = store.manifest("attribute", n.inputs["attribute"].key).metrics
        se = store.manifest("select", n.key).metrics
        rows.append({"cycle": n.cycle, "core_in": tr["core_size"], "train_fvu": tr["train_fvu"],
                     "heldout_fvu": at["fvu"], "l0": at["l0"], "core_out": se["core_size"]})
    return pd.DataFrame(rows)


def cycle_text(cfg: Config, store: AnyStore, p: Plan) -> str:
    """The cycle table as `dmsae run` prints it at the end of a finished run."""
    rows = ["cycle  core in  train FVU  attr. FVU  L0      core out"]
    for c in range(cfg.cycles):
        tr = store.manifest("train", p.find("train", c).key).metrics
        at = store.manifest("attribute", p.find("attribute", c).key).metrics
        se = store.manifest("select", p.find("select", c).key).metrics
        rows.append(f"{c:<6} {tr['core_size']:<8} {tr['train_fvu']:<10.3f} {at['fvu']:<10.3f} "
                    f"{at['l0']:<7.1f} {se['core_size']}")
    return "\n".join(rows)


def core_budget_warnings(store: AnyStore, p: Plan) -> list[str]:
    """SAEs whose core alone fires on about k latents per token, so dynamic L0 clipped the non-core k to 1."""
    notes = []
    for n in p.nodes:
        if n.stage not in ("train", "reuse") or not store.has(n.stage, n.key):
            continue
        m = store.manifest(n.stage, n.key).metrics
        if m.get("core_size") and m.get("k_noncore") == 1 and m.get("core_l0", 0) >= m["k"] - 1:
            notes.append(f"- `{n.label}`: the core fires on {m['core_l0']:.1f} latents per token against k={m['k']}, "
                         f"so the non-core keeps 1 latent and the total L0 is {m['train_l0']:.1f}, not k.")
    return notes


def core_cap_notes(store: AnyStore, p: Plan) -> list[str]:
    """Cycles where `selection.max_core` truncated the smallest set reaching tau, with what the kept core explains."""
    notes = []
    for n in p.of_stage("select"):
        if not store.has("select", n.key):
            continue
        m = store.manifest("select", n.key).metrics
        if m.get("cap_bit"):
            notes.append(f"- `{n.label}`: {m['n_reach_tau']} latents reach tau = {m['tau']}; the cap kept "
                         f"{m['core_size']}, which explain {m['explained_fraction']:.3f} of the attribution.")
    return notes


def matched_table(table: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The cored arms against no core at equal total L0 (see dmsae.eval.l0match), for one seed."""
    arms = table[(table.arm != "cycle") & (table.seed == seed)]
    if arms.empty or "none" not in set(arms.arm):
        return pd.DataFrame()
    d = matched_deltas(arms)
    if d.empty:
        return d
    return d[["arm", "k", "l0", "ce_loss_score", "none_ce_loss_score", "d_ce_loss_score", "explained_variance",
              "none_explained_variance", "d_explained_variance", "extrapolated"]]


# -- plots ------------------------------------------------------------------------------------------
def plot_cumulative_attribution(store: AnyStore, p: Plan, tau: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in p.of_stage("select"):
        if not store.has("select", n.key):
            continue
        cum = readers.core(store.load("select", n.key, verify=False))["cumulative"].numpy()
        if cum.size == 0 or cum[-1] <= 0:
            continue
        size = store.manifest("select", n.key).metrics["core_size"]
        line = ax.plot(np.arange(1, cum.size + 1), cum / cum[-1], label=f"cycle {n.cycle}: core {size}")[0]
        ax.axvline(size, color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(tau, color="black", linestyle="--", linewidth=1, label=f"tau = {tau}")
    ax.set_xscale("log")
    ax.set_xlabel("latents, by descending attribution score")
    ax.set_ylabel("cumulative fraction of attribution")
    ax.set_title("Cumulative attribution per cycle")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_core_origins(store: AnyStore, p: Plan, path: Path) -> None:
    selects = p.of_stage("select")
    counts = np.zeros((len(selects), len(selects)))
    for i, n in enumerate(selects):
        if not store.has("select", n.key):
            continue
        lineage = readers.core(store.load("select", n.key, verify=False))["lineage"]
        for born in lineage[:, 0].tolist():
            counts[i, born] += 1
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bottom = np.zeros(len(selects))
    for born in range(len(selects)):
        if counts[:, born].any():
            ax.bar(range(len(selects)), counts[:, born], bottom=bottom, label=f"born in cycle {born}")
            bottom += counts[:, born]
    ax.set_xticks(range(len(selects)))
    ax.set_xlabel("core selected after cycle")
    ax.set_ylabel("core latents")
    ax.set_title("Core latent origins")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_arms(table: pd.DataFrame, seed: int, path: Path) -> None:
    """The three arms across k, and CE-loss score against L0: arms with a dense core reach a higher L0
    at the same k, so the last panel is the comparison at equal sparsity."""
    arms = table[(table.arm != "cycle") & (table.seed == seed)]
    panels = [("k", "ce_loss_score", "CE-loss score"), ("k", "explained_variance", "explained variance"),
              ("k", "l0", "L0"), ("l0", "ce_loss_score", "CE-loss score vs L0")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (x, y, title) in zip(axes, panels, strict=True):
        for arm, color in ARM_COLORS.items():
            rows = arms[arms.arm == arm].sort_values("k")
            if len(rows):
                ax.plot(rows[x], rows[y], marker="o", color=color, label=ARM_LABELS[arm])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k" if x == "k" else "L0 (total, eval tokens)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("Distilled vs random vs no core")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_interpret(table: pd.DataFrame, seed: int, path: Path) -> None:
    """Absorption and sparse probing of the three arms against L0."""
    arms = table[(table.arm != "cycle") & (table.seed == seed)]
    panels = [("absorption_fraction", "absorption fraction (lower is better)"),
              ("absorption_rate", "full-absorption rate (lower is better)"),
              ("sparse_probe_k1", "sparse probing, k=1 (test accuracy)"),
              ("sparse_probe_k5", "sparse probing, k=5 (test accuracy)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (y, title) in zip(axes, panels, strict=True):
        for arm, color in ARM_COLORS.items():
            rows = arms[arms.arm == arm].sort_values("l0")
            if len(rows) and rows[y].notna().any():
                ax.plot(rows["l0"], rows[y], marker="o", color=color, label=ARM_LABELS[arm])
        if y.startswith("sparse") and arms["dense_probe"].notna().any():
            ax.axhline(float(arms["dense_probe"].iloc[0]), color="black", linestyle=":", label="dense probe (residual)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (total, eval tokens)")
        ax.set_title(title, fontsize=10)
    handles, labels = axes[2].get_legend_handles_labels()
    if handles:
        axes[2].legend(fontsize=8)
    fig.suptitle("Feature quality of the three arms at their measured L0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curves(store: AnyStore, p: Plan, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for n in p.of_stage("train"):
        if not store.has("train", n.key):
            continue
        curve = pd.read_parquet(store.load("train", n.key, verify=False).file(readers.CURVE_FILE))
        axes[0].plot(curve.tokens, curve.fvu.rolling(5, min_periods=1).mean(), label=f"cycle {n.cycle}")
    for n in p.of_stage("reuse"):
        if n.params["seed"] != p.of_stage("reuse")[0].params["seed"] or not store.has("reuse", n.key):
            continue
        curve = pd.read_parquet(store.load("reuse", n.key, verify=False).file(readers.CURVE_FILE))
        arm = n.params["arm"]
        axes[1].plot(curve.tokens, curve.fvu.rolling(5, min_periods=1).mean(), color=ARM_COLORS[arm],
                     alpha=0.4 + 0.6 * (n.params["sae"]["k"] / max(1, max(x.params["sae"]["k"]
                                                                          for x in p.of_stage("reuse")))),
                     label=f"{ARM_LABELS[arm]}, k={n.params['sae']['k']}")
    for ax, title in zip(axes, ["distillation cycles", "reuse SAEs"], strict=True):
        ax.set_xlabel("training tokens")
        ax.set_ylabel("FVU (batch, smoothed)")
        ax.set_yscale("log")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report ---------------------------------------------------------------------------------------
def summary_markdown(cfg: Config, store: AnyStore, p: Plan, table: pd.DataFrame, figures: list[str],
                     interp: pd.DataFrame, cosines: pd.DataFrame) -> str:
    """`interp`: `interpret_table`; `cosines`: `core_decoder_cosines` (either empty when there is none)."""
    final = p.last_core()
    cap = cfg.selection.core_cap(cfg.sae.k)
    parts = [f"# dmsae run `{cfg.name}`", "",
             f"Model `{cfg.model.path}`, layer {cfg.harvest.layer}, width {cfg.sae.width}, k {cfg.sae.k}, "
             f"tau {cfg.selection.tau}, {cfg.cycles} cycles, core gate `{cfg.sae.core_gate}`"
             + (f" (bias {'frozen' if cfg.sae.freeze_core_bias else 'trained'})" if cfg.sae.core_gate == "relu_bias"
                else "")
             + (f", core capped at {cap} latents" if cap else "")
             + f". Final core: `{store.where('select', final.key)}`.",
             "", "## Distillation cycles", "", md_table(cycle_table(store, p)),
             "", "## Core overlap between cycles", "", md_table(core_overlap(store, p))]
    capped = core_cap_notes(store, p)
    if capped:
        parts += ["", "## Where the core cap bit", ""] + capped
    warnings = core_budget_warnings(store, p)
    if warnings:
        parts += ["", "## Core larger than the L0 budget", ""] + warnings
    if not table.empty:
        matched = matched_table(table, cfg.seed)
        if not matched.empty:
            parts += ["", "## At equal total L0", "",
                      "Each cored SAE against the no-core arm's curve read at the L0 it measured (linear in log L0; "
                      "`extrapolated`: up to 15% past the curve's ends). `d_*` > 0: the core helps.", "",
                      md_table(matched)]
        controls = controls_table(table, cfg.seed)
        if not controls.empty:
            parts += ["", "## The controls", "",
                      "The distilled arm minus each control at equal total L0 (`curve`: the arm read at the other's "
                      "measured L0). `frequency`: the most often firing latents of the same SAE on the attribution "
                      "split, as many as the distilled core; `none_compute`: no core, trained on as many tokens as "
                      "the whole distillation (cycles + 1 trainings); `random`: a random core of the same size. "
                      "One seed: no interval; `dmsae ablate` over seeds gives one.", "", md_table(controls, "{:.4f}")]
        stability = summarise_cosines(cosines)
        if not stability.empty:
            parts += ["", "## The core's decoders across reuse k", "",
                      "Each final-core latent's decoder row in the distilled SAE at k against its row at the "
                      "reference k (the encoder rows are the same frozen vectors).", "", md_table(stability)]
        if not interp.empty:
            parts += ["", "## Absorption and sparse probing", "",
                      "First-letter absorption (Chanin et al., as in SAEBench: mean over letters whose probe F1 > "
                      "0.6; lower is better) and k-sparse probing accuracy on held-out texts (mean over the language "
                      "and topic tasks; `dense_probe`: all residual dimensions). Definitions: docs/design.md.", "",
                      md_table(interp)]
        parts += ["", "## SAEs on held-out eval tokens", "", md_table(table),
                  "", "## Seed consistency", "",
                  "Between the two consistency seeds' SAEs of each arm: the mean best decoder cosine, and the shared "
                  "fraction of Paulo & Belrose (encoders and decoders Hungarian-matched, shared when both pair a "
                  "latent with the same latent at cosine >= 0.7) with its chance level.", "",
                  md_table(seed_consistency(store, p, cfg))]
    if any(store.has(n.stage, n.key) for n in p.of_stage("latents")):
        parts += ["", "## Latent cards", "", "One card per final-core latent and a sample of the others: "
                  "[latents/index.html](latents/index.html)."]
    parts += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(parts) + "\n"


def render_cards(cfg: Config, node: Node, art: Artifact, out: Path, store: AnyStore | None = None,
                 p: Plan | None = None) -> Path:
    """The latent cards' site from a latents artifact; returns its index.html."""
    from dmsae.reports.cards import write_cards

    meta = {"run": cfg.name, "sae": node.inputs["train"].label, "model": cfg.model.path, "layer": cfg.harvest.layer,
            "k": cfg.sae.k, "width": cfg.sae.width, "held_out_tokens": art.metrics["n_tokens"]}
    latents = pd.read_parquet(art.file(readers.LATENTS_FILE))
    if store is not None and p is not None:  # the frequency control core is a set of latents of the same SAE
        for n in p.of_stage("frequency_core"):
            if n.inputs["train"].key == node.inputs["train"].key and store.has(n.stage, n.key):
                idx = set(readers.core(store.load(n.stage, n.key))["indices"].tolist())
                latents["in_frequency_core"] = latents.latent.isin(idx)
                m = store.manifest(n.stage, n.key).metrics
                meta["frequency_core"] = (f"{len(idx)} latents, {int(latents.in_frequency_core.sum())} shown here, "
                                          f"{m['shared_with_distilled']} in the distilled core")
    return write_cards(latents, pd.read_parquet(art.file(readers.CONTEXTS_FILE)), out, meta)


def write_report(cfg: Config, store: AnyStore, p: Plan, out_dir: Path) -> Path:
    """Write summary.md, metrics.parquet and the PNG plots; returns the summary's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(store, p)
    figures = ["cumulative_attribution.png", "core_origins.png", "training_curves.png"]
    plot_cumulative_attribution(store, p, cfg.selection.tau, out_dir / figures[0])
    plot_core_origins(store, p, out_dir / figures[1])
    plot_training_curves(store, p, out_dir / figures[2])
    interp = cosines = pd.DataFrame()
    if not table.empty:
        figures.append("arms.png")
        plot_arms(table, cfg.seed, out_dir / "arms.png")
        table.to_parquet(out_dir / "metrics.parquet", index=False)
        interp = interpret_table(store, p, table)
        if not interp.empty:
            figures.append("interpret.png")
            plot_interpret(interp, cfg.seed, out_dir / "interpret.png")
            interp.to_parquet(out_dir / "interpret.parquet", index=False)
        cosines = core_decoder_cosines(store, p, cfg)
        if not cosines.empty:
            cosines.to_parquet(out_dir / "core_decoder_cosines.parquet", index=False)
    cards = [n for n in p.of_stage("latents") if store.has(n.stage, n.key)]
    if cards:
        render_cards(cfg, cards[0], store.load(cards[0].stage, cards[0].key), out_dir / "latents", store, p)
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(cfg, store, p, table, figures, interp, cosines))
    return summary
