"""The convergence study's report: FVU, CE-loss score, dead fraction and cross-seed overlap of the no-core SAE
against its training tokens, where each flattens, and a plot (flows/convergence.py computes the points)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from dmsae import readers
from dmsae.config import Config
from dmsae.eval.overlap import chance_overlap, dictionary_overlap
from dmsae.plan import Node, Plan
from dmsae.reports.tables import md_table, write_text_atomically
from dmsae.stores import AnyStore, store_for

# A metric has flattened at a budget when four times the tokens moves it by less than this (about the seed
# noise of each measured on the quickstart: RESULTS.md, the noise floor)
FLAT = {"fvu": 0.005, "ce_loss_score": 0.002, "dead_fraction": 0.01, "overlap": 0.02}
LABELS = {"fvu": "FVU (held out)", "ce_loss_score": "CE-loss score", "dead_fraction": "dead fraction",
          "overlap": "cross-seed shared fraction"}


Point = tuple[Config, Plan]  # a point's config and its plan (flows.convergence plans them)


def study_nodes(p: Plan) -> tuple[Node, Node]:
    """(train[0], evaluate[cycle=0]) of a point's plan: the no-core cycle-0 SAE and its evaluation."""
    train = next(n for n in p.nodes if n.stage == "train" and n.cycle == 0)
    evaluate = next(n for n in p.nodes if n.stage == "evaluate" and n.inputs.get("sae") == train)
    return train, evaluate


def whole(x: float) -> int | float:
    """An integral number as an int (tables print it without decimals)."""
    return int(x) if float(x).is_integer() else x


def point_rows(points: list[Point], store: AnyStore) -> pd.DataFrame:
    """One row per point the store has evaluated: epochs, seed, tokens trained, and its held-out metrics."""
    rows: list[dict[str, Any]] = []
    for cfg, p in points:
        train, evaluate = study_nodes(p)
        harvest = train.inputs["harvest"]
        if not store.has("evaluate", evaluate.key):
            continue
        m = store.manifest("evaluate", evaluate.key).metrics
        n_tokens = int(store.manifest("harvest", harvest.key).metrics["n_tokens"])
        ev = m.get("explained_variance")
        seconds = store.manifest("train", train.key).timings.get("seconds")
        rows.append({"epochs": whole(cfg.train.epochs), "seed": cfg.seed, "tokens": whole(cfg.train.epochs * n_tokens),
                     "fvu": None if ev is None else 1.0 - ev, "ce_loss_score": m.get("ce_loss_score"),
                     "dead_fraction": m.get("dead_fraction"), "l0": m.get("l0"),
                     "train_seconds": None if seconds is None else round(seconds)})
    return pd.DataFrame(rows)


def overlap_rows(points: list[Point], store: AnyStore) -> pd.DataFrame:
    """The shared fraction of the first two seeds' whole dictionaries at every budget both have trained."""
    seeds = sorted({c.seed for c, _ in points})[:2]
    rows: list[dict[str, Any]] = []
    if len(seeds) < 2:
        return pd.DataFrame(rows)
    for epochs in sorted({c.train.epochs for c, _ in points}):
        trains = [study_nodes(p)[0] for c, p in points if c.train.epochs == epochs and c.seed in seeds]
        if len(trains) != 2 or not all(store.has("train", t.key) for t in trains):
            continue
        (a, _), (b, _) = (readers.load_sae(store.load("train", t.key)) for t in trains)
        o = dictionary_overlap(a.enc.T, a.dec, b.enc.T, b.dec)
        rows.append({"epochs": whole(epochs), "overlap": o.fraction, "agree": o.agree / o.matched,
                     "encoder_cosine": o.mean_encoder_cosine, "decoder_cosine": o.mean_decoder_cosine,
                     "chance": chance_overlap(o.n_a, o.n_b, a.dec.shape[1])})
    return pd.DataFrame(rows)


def flattens(curve: pd.Series, budgets: list[int], metric: str) -> str:
    """Where a metric (mean over seeds, by budget) flattens: the first budget after which four times the tokens
    moves it by less than FLAT[metric]."""
    values = [curve.get(b) for b in budgets]
    for i in range(len(budgets) - 1):
        a, b = values[i], values[i + 1]
        if a is None or b is None or math.isnan(a) or math.isnan(b):  # a budget not finished yet
            continue
        if abs(b - a) < FLAT[metric]:
            return f"flat from {budgets[i]} epoch(s) on ({a:.4f} -> {b:.4f} at {budgets[i + 1]})"
    done = [(e, v) for e, v in zip(budgets, values, strict=True) if v is not None and not math.isnan(v)]
    if len(done) < 2:
        return "not enough points yet"
    (e_a, a), (e_b, b) = done[-2:]
    return f"still moving at the largest finished budget ({a:.4f} at {e_a} -> {b:.4f} at {e_b} epochs)"


def plot(metrics: pd.DataFrame, overlap: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    budgets = sorted(set(metrics["tokens"] / 1e6))

    def token_axis(ax: Any) -> None:
        """Log scale, one labelled tick per budget ("1M", "3.9M", ...), no minor labels."""
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{t:.2g}M" for t in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training tokens")

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, metric in zip(axes[:3], ("fvu", "ce_loss_score", "dead_fraction"), strict=True):
        for seed, g in metrics.groupby("seed"):
            g = g.sort_values("tokens")
            ax.plot(g["tokens"] / 1e6, g[metric], marker="o", label=f"seed {seed}")
        token_axis(ax)
        ax.set_title(LABELS[metric])
        ax.legend(fontsize=8)
    ax = axes[3]
    if not overlap.empty:
        tokens = overlap["epochs"].map(dict(zip(metrics["epochs"], metrics["tokens"], strict=False))) / 1e6
        ax.plot(tokens, overlap["overlap"], marker="o", label="shared (cos >= 0.7, both matchings)")
        ax.plot(tokens, overlap["chance"], linestyle="--", color="gray", label="chance")
        ax.legend(fontsize=8)
    token_axis(ax)
    ax.set_title(LABELS["overlap"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_convergence_report(points: list[Point], out: Path, command: str) -> Path:
    """Write convergence.md, convergence.csv and convergence.png into `out` from what the store holds."""
    out.mkdir(parents=True, exist_ok=True)
    base = points[0][0]
    store = store_for(base)
    metrics, overlap = point_rows(points, store), overlap_rows(points, store)
    budgets = sorted({whole(c.train.epochs) for c, _ in points})
    lines = ["# Convergence of the no-core SAE with training tokens", "",
             f"Made by `{command}`. Base: `{base.name}` (width {base.sae.width}, k {base.sae.k}, "
             f"batch {base.train.batch_size}, lr {base.train.lr}, precision {base.precision.sae}); "
             f"cycle 0 of each point, evaluated on the held-out split. A budget is epochs over the harvest "
             "(the corpus is used again past one epoch). `train_seconds`: the training's wall clock, waits for "
             "a busy CPU included.", ""]
    if metrics.empty:
        lines += ["No point is finished yet."]
    else:
        metrics.to_csv(out / "convergence.csv", index=False)
        lines += ["## Points", "", md_table(metrics, "{:.4f}"), ""]
        if not overlap.empty:
            lines += ["## Cross-seed overlap (seeds " + ", ".join(map(str, sorted({c.seed for c, _ in points})[:2]))
                      + ")", "", "Hungarian matching of encoders and of decoders; a latent is shared when both "
                      "pair it with the same latent with cosine >= 0.7. Chance: random unit vectors, same sizes.",
                      "", md_table(overlap, "{:.4f}"), ""]
        means = metrics.groupby("epochs")[["fvu", "ce_loss_score", "dead_fraction"]].mean()
        lines += ["## Where each flattens", "",
                  "Flat: four times the tokens moves the metric (mean over seeds) by less than "
                  + ", ".join(f"{v} ({LABELS[k]})" for k, v in FLAT.items()) + ".", ""]
        for metric in ("fvu", "ce_loss_score", "dead_fraction"):
            lines.append(f"- {LABELS[metric]}: {flattens(means[metric], budgets, metric)}")
        if not overlap.empty:
            lines.append(f"- {LABELS['overlap']}: "
                         f"{flattens(overlap.set_index('epochs')['overlap'], budgets, 'overlap')}")
        plot(metrics, overlap, out / "convergence.png")
        lines += ["", "![convergence](convergence.png)"]
    return write_text_atomically(out / "convergence.md", "\n".join(lines) + "\n")
