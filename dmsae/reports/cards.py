"""Latent cards: a static, self-contained HTML site with one page per SAE latent.

`write_cards(latents, contexts, out_dir, meta)` writes `out_dir/index.html` (a sortable, filterable
table of every latent) and one `out_dir/latent-<id>.html` card per latent: its header statistics,
an activation histogram, the tokens its decoder direction promotes and suppresses through the
unembedding, and its top-activating contexts with every token shaded by activation.

The pages need nothing outside themselves: CSS, JS and SVG are inline (the CSS and the two scripts are
package data, `dmsae/reports/cards_assets/`), and a Content-Security-Policy forbids any network fetch and
lets only the page's own script (pinned by its hash) run, so a token that slipped through escaping still
could not execute. Every token is escaped with `html.escape`;
whitespace and control characters are drawn as visible glyphs (␣ ↵ ⇥ ⟨U+…⟩). Displayed numbers are
rounded to 3 significant digits; the exact values sit in `data-*` attributes as Python `repr`s.

The same input gives the same bytes: nothing time- or host-dependent is written, latents are ordered
by id and contexts by rank. The site is built in a temporary folder next to `out_dir` and swapped in
with renames, so an interrupted write leaves the previous site (or none), never half of one.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import math
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

LATENT_COLUMNS = ("latent", "kind", "born_cycle", "times_selected", "attribution", "density", "mean_act", "max_act",
                  "hist_edges", "hist_counts", "top_logit_tokens", "top_logit_values", "bottom_logit_tokens",
                  "bottom_logit_values")
CONTEXT_COLUMNS = ("latent", "rank", "tokens", "acts", "center", "max_act")
KINDS = ("core", "non-core")
INDEX_TOP_TOKENS = 6  # top-logit tokens shown per row of the index table
TITLE_KEYS = ("sae", "sae_label", "label", "run", "run_name")  # first one present in meta titles the pages

_WS_GLYPHS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
_HIGHLIGHT_RGB = "255,122,0"


def card_filename(latent: int) -> str:
    return f"latent-{int(latent)}.html"


def write_cards(latents: pd.DataFrame, contexts: pd.DataFrame, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Render the site into `out_dir` (replacing a previous site there); returns the index.html path.

    `out_dir` must be absent, empty, or hold a previous site (an index.html): it is replaced whole.
    """
    out_dir = Path(out_dir)
    rows = _latent_rows(latents)
    by_latent = _contexts_by_latent(contexts, {r["latent"] for r in rows})
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / "index.html").is_file():
            raise ValueError(f"{out_dir} is not empty and holds no index.html: refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published site should be readable like any folder
        (tmp / "index.html").write_bytes(_render_index(rows, meta).encode("utf-8"))
        for i, row in enumerate(rows):
            prev_id = rows[i - 1]["latent"] if i > 0 else None
            next_id = rows[i + 1]["latent"] if i + 1 < len(rows) else None
            page = _render_card(row, by_latent.get(row["latent"], []), meta, prev_id, next_id)
            (tmp / card_filename(row["latent"])).write_bytes(page.encode("utf-8"))
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp`; the old site is moved aside first and restored if the swap fails."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "site")
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old / "site", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- input


def _as_list(v: Any) -> list[Any]:
    """A list cell as a list: parquet round-trips give numpy arrays, a missing cell None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return []
    if isinstance(v, str):
        raise ValueError(f"expected a list, got the string {v!r}")
    return list(v)


def _float(v: Any) -> float:
    return float("nan") if v is None or v is pd.NA else float(v)


def _require(df: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}")


def _latent_rows(latents: pd.DataFrame) -> list[dict[str, Any]]:
    _require(latents, LATENT_COLUMNS, "latents")
    rows = []
    for rec in latents.to_dict("records"):
        r = {
            "latent": int(rec["latent"]),
            "kind": str(rec["kind"]),
            "born_cycle": int(rec["born_cycle"]),
            "times_selected": int(rec["times_selected"]),
            **{c: _float(rec[c]) for c in ("attribution", "density", "mean_act", "max_act")},
            "hist_edges": [float(x) for x in _as_list(rec["hist_edges"])],
            "hist_counts": [int(x) for x in _as_list(rec["hist_counts"])],
            # optional: the latent is in the frequency control core (the run's report adds the column)
            "in_frequency_core": bool(rec.get("in_frequency_core", False)),
        }
        for side in ("top", "bottom"):
            toks = [str(t) for t in _as_list(rec[f"{side}_logit_tokens"])]
            vals = [float(x) for x in _as_list(rec[f"{side}_logit_values"])]
            if len(toks) != len(vals):
                raise ValueError(f"latent {r['latent']}: {len(toks)} {side} logit tokens but {len(vals)} values")
            r[f"{side}_logits"] = list(zip(toks, vals, strict=True))
        if r["hist_counts"] and len(r["hist_edges"]) != len(r["hist_counts"]) + 1:
            raise ValueError(f"latent {r['latent']}: {len(r['hist_edges'])} histogram edges for "
                             f"{len(r['hist_counts'])} bins")
        rows.append(r)
    ids = [r["latent"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"latents lists ids more than once: {dup[:10]}")
    return sorted(rows, key=lambda r: r["latent"])


def _contexts_by_latent(contexts: pd.DataFrame, keep: set[int]) -> dict[int, list[dict[str, Any]]]:
    _require(contexts, CONTEXT_COLUMNS, "contexts")
    out: dict[int, list[dict[str, Any]]] = {}
    for rec in contexts.to_dict("records"):
        latent = int(rec["latent"])
        if latent not in keep:
            continue
        c = {
            "rank": int(rec["rank"]),
            "tokens": [str(t) for t in _as_list(rec["tokens"])],
            "acts": [float(a) for a in _as_list(rec["acts"])],
            "center": int(rec["center"]),
            "max_act": _float(rec["max_act"]),
        }
        if len(c["tokens"]) != len(c["acts"]):
            raise ValueError(f"latent {latent} context {c['rank']}: {len(c['tokens'])} tokens, {len(c['acts'])} acts")
        if not 0 <= c["center"] < len(c["tokens"]):
            raise ValueError(f"latent {latent} context {c['rank']}: center {c['center']} outside the window")
        out.setdefault(latent, []).append(c)
    for cs in out.values():
        cs.sort(key=lambda c: c["rank"])
    return out


# ------------------------------------------------------------------------------------------ formatting


def fmt(x: float | None) -> str:
    """3 significant digits, without an exponent between 1e-4 and 1e6; an em dash for a missing value."""
    if x is None or math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{float(f'{x:.3g}'):g}"


def fmt_pct(x: float) -> str:
    return "—" if math.isnan(x) else fmt(100 * x) + "%"


def _exact(x: float | int) -> str:
    """The exact value for a data- attribute."""
    return repr(x)


def _text(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _attr(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _meta_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return fmt(v)
    return str(v)


@functools.lru_cache(maxsize=1 << 16)  # real text repeats its tokens a lot
def token_html(tok: str, *, all_spaces: bool = False) -> str:
    """A token as escaped HTML with whitespace and control characters drawn visibly.

    Newlines, tabs and carriage returns always show as glyphs; spaces do when `all_spaces` is set or the
    token is whitespace only (else ' the' keeps its ordinary leading space, shown by `white-space: pre`).
    """
    if tok == "":
        return '<span class="ws" title="empty token">∅</span>'
    blank = tok.isspace()
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            out.append(html.escape("".join(run), quote=True))
            run.clear()

    for ch in tok:
        glyph = None
        if ch in _WS_GLYPHS and (ch != " " or all_spaces or blank):
            glyph = _WS_GLYPHS[ch]
        elif ch != " " and (ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cn", "Cs")):
            glyph = f"⟨U+{ord(ch):04X}⟩"
        if glyph is None:
            run.append(ch)
        else:
            flush()
            out.append(f'<span class="ws">{glyph}</span>')
    flush()
    return "".join(out)


# ------------------------------------------------------------------------------------------------ pages

def _asset(name: str) -> str:
    """A file of `cards_assets/`, inlined into every page byte for byte: the Content-Security-Policy pins each
    script by its sha256, so the files carry no trailing newline that the pages do not have."""
    return (resources.files("dmsae.reports") / "cards_assets" / name).read_bytes().decode("utf-8")


_CSS = _asset("site.css")
_INDEX_JS = _asset("index.js")  # the index table's sorting and filtering
_CARD_JS = _asset("card.js")  # arrow keys step between cards


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "base-uri 'none'; form-action 'none'")


def _page(title: str, body: str, script: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_attr(_csp(script))}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{_text(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        f"<script>{script}</script>\n</body>\n</html>\n"
    )


def _site_title(meta: Mapping[str, Any]) -> str:
    for k in TITLE_KEYS:
        if meta.get(k) not in (None, ""):
            return str(meta[k])
    return "SAE"


def _meta_html(meta: Mapping[str, Any]) -> str:
    if not meta:
        return ""
    items = "".join(f"<div><dt>{_text(k)}</dt><dd>{_text(_meta_value(v))}</dd></div>" for k, v in meta.items())
    return f'<dl class="meta" aria-label="Run">{items}</dl>'


def _born(c: int) -> str:
    return "unknown" if c < 0 else str(c)


def _chips(tokens: Iterable[str]) -> str:
    return "".join(f'<code class="tok">{token_html(t, all_spaces=True)}</code>' for t in tokens)


# ------------------------------------------------------------------------------------------------ index

_INDEX_COLUMNS = (  # key (row dataset), header, numeric, explanation
    ("latent", "Latent", True, "index of the latent in the SAE; opens its card"),
    ("kind", "Kind", False, "core (in the distilled core set) or non-core"),
    ("born", "Born", True, "distillation cycle the latent was born in"),
    ("selected", "Selected", True, "how many cycles' core selections included it"),
    ("attribution", "Attribution", True, "its attribution score (— when not scored)"),
    ("density", "Density", True, "share of held-out tokens on which it fires"),
    ("maxAct", "Max act", True, "largest activation seen on held-out tokens"),
    ("", "Top logits", False, "tokens its decoder direction most promotes (W_dec · W_U)"),
)


def _index_row(r: dict[str, Any]) -> str:
    lid = r["latent"]
    top = [t for t, _ in r["top_logits"]]
    frequency = r.get("in_frequency_core", False)
    search = " ".join([str(lid), r["kind"], *(["frequency"] if frequency else []), *top]).lower()
    data = {
        "latent": lid, "kind": r["kind"], "born": r["born_cycle"], "selected": r["times_selected"],
        "attribution": _exact(r["attribution"]), "density": _exact(r["density"]),
        "mean-act": _exact(r["mean_act"]), "max-act": _exact(r["max_act"]), "search": search,
    }
    attrs = " ".join(f'data-{k}="{_attr(v)}"' for k, v in data.items())
    return (
        f"<tr {attrs}>"
        f'<td class="num"><a href="{card_filename(lid)}">{lid}</a></td>'
        f'<td><span class="badge {_attr(r["kind"])}">{_text(r["kind"])}</span>'
        + (' <span class="badge frequency" title="in the frequency control core">frequency</span>' if frequency else "")
        + "</td>"
        f'<td class="num">{_born(r["born_cycle"])}</td>'
        f'<td class="num">{r["times_selected"]}</td>'
        f'<td class="num">{fmt(r["attribution"])}</td>'
        f'<td class="num">{fmt_pct(r["density"])}</td>'
        f'<td class="num">{fmt(r["max_act"])}</td>'
        f"<td>{_chips(top[:INDEX_TOP_TOKENS])}</td>"
        "</tr>"
    )


def _render_index(rows: list[dict[str, Any]], meta: Mapping[str, Any]) -> str:
    title = _site_title(meta)
    n_core = sum(r["kind"] == "core" for r in rows)
    heads = []
    for key, label, numeric, explain in _INDEX_COLUMNS:
        cls = ' class="num"' if numeric else ""
        if key:
            heads.append(f'<th scope="col"{cls} data-key="{key}" data-type="{"num" if numeric else "text"}" '
                         f'aria-sort="none" title="{_attr(explain)}"><button type="button">{label}</button></th>')
        else:
            heads.append(f'<th scope="col"{cls} title="{_attr(explain)}">{label}</th>')
    explain = "".join(f"<div><dt>{label}</dt><dd>{_text(e)}</dd></div>" for _, label, _, e in _INDEX_COLUMNS)
    kinds = "".join(f'<option value="{k}">{k}</option>' for k in KINDS)
    n_frequency = sum(bool(r.get("in_frequency_core")) for r in rows)
    frequency_note = f"; {n_frequency} in the frequency control core, filter: frequency" if n_frequency else ""
    body = f"""<header class="top">
<h1>Latent cards — {_text(title)}</h1>
{_meta_html(meta)}
<dl class="explain">{explain}</dl>
</header>
<main>
<div class="controls" role="search">
<label>Filter <input id="q" type="search" placeholder="latent id or token" autocomplete="off"></label>
<label>Kind <select id="kind"><option value="all">all</option>{kinds}</select></label>
<span id="count" aria-live="polite">{len(rows)} of {len(rows)} latents shown</span>
</div>
<table class="latents" id="latents">
<caption>{len(rows)} latents ({n_core} core, {len(rows) - n_core} non-core{frequency_note}). Click a column header to \
sort.</caption>
<thead><tr>{"".join(heads)}</tr></thead>
<tbody>
{chr(10).join(_index_row(r) for r in rows)}
</tbody>
</table>
</main>"""
    return _page(f"Latent cards — {title}", body, _INDEX_JS)


# ------------------------------------------------------------------------------------------------- card


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    i = first
    while i * step <= hi + step * 1e-9:
        ticks.append(round(i * step, 12))
        i += 1
    return ticks


def _histogram_svg(r: dict[str, Any]) -> str:
    edges, counts = r["hist_edges"], r["hist_counts"]
    if not counts or sum(counts) == 0:
        return '<p class="empty">No nonzero activations were recorded on the held-out tokens.</p>'
    w, h = 540, 230
    ml, mr, mt, mb = 58, 14, 12, 46
    pw, ph = w - ml - mr, h - mt - mb
    lo, hi = edges[0], edges[-1]
    if not hi > lo:
        hi = lo + 1.0
    ymax = max(counts)
    ystep = _nice_ticks(0, ymax, 4)
    ystep_size = max(1, ystep[1] - ystep[0]) if len(ystep) > 1 else 1  # counts: whole-number ticks
    ytop = ystep_size * math.ceil(ymax / ystep_size)
    yticks = [i * ystep_size for i in range(int(round(ytop / ystep_size)) + 1)]

    def x(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    def y(c: float) -> float:
        return mt + ph - c / ytop * ph

    parts = [f'<svg class="hist" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-labelledby="hist-title hist-desc" xmlns="http://www.w3.org/2000/svg">',
             '<title id="hist-title">Activation histogram</title>',
             f'<desc id="hist-desc">Counts of the nonzero activations of latent {r["latent"]} on held-out tokens, '
             f"in {len(counts)} bins from {fmt(lo)} to {fmt(edges[-1])}.</desc>"]
    for t in yticks:
        parts.append(f'<line class="grid" x1="{ml}" x2="{ml + pw}" y1="{y(t):.2f}" y2="{y(t):.2f}"/>')
        parts.append(f'<text x="{ml - 6}" y="{y(t) + 4:.2f}" text-anchor="end">{fmt(t)}</text>')
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        x0, x1 = x(edges[i]), x(edges[i + 1])
        mid = (edges[i] + edges[i + 1]) / 2
        opacity = 0.3 + 0.65 * min(max((mid - lo) / (hi - lo), 0.0), 1.0)
        parts.append(f'<rect x="{x0:.2f}" y="{y(c):.2f}" width="{max(x1 - x0 - 0.6, 0.6):.2f}" '
                     f'height="{mt + ph - y(c):.2f}" fill="rgb({_HIGHLIGHT_RGB})" fill-opacity="{opacity:.3f}">'
                     f"<title>[{fmt(edges[i])}, {fmt(edges[i + 1])}): {c:,}</title></rect>")
    base = mt + ph
    parts.append(f'<line class="axis" x1="{ml}" x2="{ml + pw}" y1="{base}" y2="{base}"/>')
    parts.append(f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{base}"/>')
    for t in _nice_ticks(lo, hi, 6):
        if lo - 1e-12 <= t <= hi + 1e-12:
            parts.append(f'<line class="axis" x1="{x(t):.2f}" x2="{x(t):.2f}" y1="{base}" y2="{base + 4}"/>')
            parts.append(f'<text x="{x(t):.2f}" y="{base + 16}" text-anchor="middle">{fmt(t)}</text>')
    mean = r["mean_act"]
    if math.isfinite(mean) and lo <= mean <= hi:
        parts.append(f'<line x1="{x(mean):.2f}" x2="{x(mean):.2f}" y1="{mt}" y2="{base}" stroke="#1d232b" '
                     f'stroke-dasharray="4 3" stroke-width="1"><title>mean {fmt(mean)}</title></line>')
        parts.append(f'<text x="{x(mean) + 4:.2f}" y="{mt + 10}">mean {fmt(mean)}</text>')
    parts.append(f'<text x="{ml + pw / 2:.2f}" y="{h - 6}" text-anchor="middle">activation value</text>')
    parts.append(f'<text transform="translate(14 {mt + ph / 2:.2f}) rotate(-90)" text-anchor="middle">'
                 "count (tokens)</text>")
    parts.append("</svg>")
    return "".join(parts)


def _logit_table(pairs: list[tuple[str, float]], side: str) -> str:
    caption = "Promoted logits" if side == "pos" else "Suppressed logits"
    if not pairs:
        return f'<table class="logits {side}"><caption>{caption}</caption><tr><td class="empty">none</td></tr></table>'
    scale = max((abs(v) for _, v in pairs if math.isfinite(v)), default=0.0) or 1.0
    rows = []
    for tok, v in pairs:
        width = min(abs(v) / scale, 1.0) * 100 if math.isfinite(v) else 0.0
        rows.append(f'<tr data-token="{_attr(tok)}" data-value="{_attr(_exact(v))}">'
                    f'<td><code class="tok">{token_html(tok, all_spaces=True)}</code></td>'
                    f'<td class="val" style="--w:{width:.1f}%">{"+" if v > 0 else ""}{fmt(v)}</td></tr>')
    return (f'<table class="logits {side}"><caption>{caption}</caption>'
            f'<thead><tr><th scope="col">token</th><th scope="col">logit</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _context_html(c: dict[str, Any], denom: float) -> str:
    spans = []
    for i, (tok, act) in enumerate(zip(c["tokens"], c["acts"], strict=True)):
        ratio = act / denom if math.isfinite(act) else 0.0
        ratio = min(max(ratio, 0.0), 1.0)
        style = f' style="background:rgba({_HIGHLIGHT_RGB},{0.85 * ratio:.3f})"' if ratio > 0 else ""
        cls = "t max" if i == c["center"] else "t"
        title = f"{tok!r}  act {act!r}  ({fmt(100 * ratio)}% of max)"
        spans.append(f'<span class="{cls}" data-act="{_attr(_exact(act))}" data-token="{_attr(tok)}" '
                     f'title="{_attr(title)}"{style}>{token_html(tok)}</span>')
    return (f'<li class="ctx" data-rank="{c["rank"]}" data-max-act="{_attr(_exact(c["max_act"]))}" '
            f'data-center="{c["center"]}"><span class="ctx-meta">#{c["rank"] + 1} · max {fmt(c["max_act"])}</span>'
            f'<span class="ctx-text">{"".join(spans)}</span></li>')


def _render_card(r: dict[str, Any], contexts: list[dict[str, Any]], meta: Mapping[str, Any],
                 prev_id: int | None, next_id: int | None) -> str:
    lid = r["latent"]
    title = _site_title(meta)
    prev_link = (f'<a rel="prev" href="{card_filename(prev_id)}">← latent {prev_id}</a>' if prev_id is not None
                 else '<span class="off" aria-disabled="true">← first</span>')
    next_link = (f'<a rel="next" href="{card_filename(next_id)}">latent {next_id} →</a>' if next_id is not None
                 else '<span class="off" aria-disabled="true">last →</span>')
    stats = [
        ("Born cycle", _born(r["born_cycle"]), "born-cycle", r["born_cycle"]),
        ("Times selected", str(r["times_selected"]), "times-selected", r["times_selected"]),
        ("Attribution", fmt(r["attribution"]), "attribution", _exact(r["attribution"])),
        ("Density", fmt_pct(r["density"]), "density", _exact(r["density"])),
        ("Mean act", fmt(r["mean_act"]), "mean-act", _exact(r["mean_act"])),
        ("Max act", fmt(r["max_act"]), "max-act", _exact(r["max_act"])),
    ]
    stats_html = "".join(f'<div><dt>{k}</dt><dd id="stat-{key}" data-value="{_attr(exact)}">{_text(v)}</dd></div>'
                         for k, v, key, exact in stats)
    data = " ".join(f'data-{key}="{_attr(exact)}"' for _, _, key, exact in stats)

    denom = r["max_act"]
    if not (math.isfinite(denom) and denom > 0):
        denom = max((a for c in contexts for a in c["acts"] if math.isfinite(a)), default=0.0)
    if not denom > 0:
        denom = 1.0
    if contexts:
        ctx_html = ('<p class="hint">Each token is shaded by its activation relative to the latent\'s max '
                    f'({fmt(denom)}): <span class="legend" aria-hidden="true"></span> 0 → max. '
                    "The token the window is centred on is bold and underlined; hover a token for its exact "
                    f'value.</p><ol class="contexts">{"".join(_context_html(c, denom) for c in contexts)}</ol>')
    else:
        ctx_html = '<p class="empty">No contexts recorded.</p>'

    body = f"""<header class="top">
<nav class="pager" aria-label="Latents"><a href="index.html">↑ all latents</a>{prev_link}{next_link}</nav>
<h1>Latent {lid} <span class="badge {_attr(r["kind"])}">{_text(r["kind"])}</span></h1>
{_meta_html(meta)}
<dl class="stats">{stats_html}</dl>
</header>
<main id="card" data-latent="{lid}" data-kind="{_attr(r["kind"])}" {data}>
<div class="row2">
<section aria-labelledby="h-hist"><h2 id="h-hist">Activation density</h2>{_histogram_svg(r)}</section>
<section aria-labelledby="h-logits"><h2 id="h-logits">Logit effects</h2>
<p class="hint">Decoder direction through the unembedding (W_dec · W_U).</p>
<div class="row2">{_logit_table(r["top_logits"], "pos")}{_logit_table(r["bottom_logits"], "neg")}</div>
</section>
</div>
<section aria-labelledby="h-ctx"><h2 id="h-ctx">Top activations ({len(contexts)} contexts)</h2>
{ctx_html}
</section>
</main>"""
    return _page(f"Latent {lid} ({r['kind']}) — {title}", body, _CARD_JS)
