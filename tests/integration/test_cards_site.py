"""The latent-card site (dmsae.reports.cards): byte-determinism and all-or-nothing writes without a browser, then
the real pages driven in headless Chromium through Playwright: the index table sorts and filters, a card
shows the right latent, contexts and max token, hostile tokens stay text, and no page logs an error.

The browser tests need `pip install playwright==1.65.2` (its wheel carries the driver) and a system
Chromium at /usr/bin/chromium (or $DMSAE_CHROMIUM); they skip, saying which is missing, without them.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dmsae.reports import cards
from dmsae.reports.cards import card_filename, write_cards

CHROMIUM = os.environ.get("DMSAE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

SCRIPT_TOKEN = "<script>window.__pwned=1</script>"
META = {"run": "tiny-run", "sae": "cycle-2", "model": "tiny-llama", "layer": 3, "k": 16, "width": 512,
        "n_tokens": 40960}

# id, kind, born, selected, attribution, density, mean, max, top logit tokens
LATENTS = [
    (42, "core", 0, 3, 0.5, 0.01234, 1.5, 6.0, [" the", "&", SCRIPT_TOKEN]),
    (7, "non-core", 2, 0, float("nan"), 0.2, 0.8, 3.25, ["\n", " ", "cat"]),
    (3, "core", 1, 2, 0.125, 0.0005, 2.0, 9.5, ["dog", " the end"]),
    (100, "non-core", -1, 0, -0.03, 0.0731, 0.3, 1.0, ["<b>", "x"]),
    (18, "core", 0, 1, 0.02, 0.5, 0.9, 2.0, ["tab\t", "\"q\""]),
    (5, "non-core", 1, 0, 0.0, 0.0, float("nan"), float("nan"), []),
]
# tokens of a context window; the token at CENTER carries the context's max
WINDOWS = {
    42: [["A", " the", " big", SCRIPT_TOKEN, " &", " ", "\n"], ["x", "<b>", "&amp;", " the", "y", "z", "."]],
    7: [["\n", "\n", " ", "cat", " sat", ".", "\n"]],
    3: [["a", "b", "c", "dog", "e", "f", "g"], ["1", "2", "3", "dog", "5", "6", "7"],
        ["p", "q", "r", "dogs", "t", "u", "v"]],
    100: [["<", "b", ">", "x", "<", "/", "b"]],
    18: [["\t", "tab\t", "tab", "\"q\"", "'", "`", "~"], ["i", "j", "k", "l", "m", "n", "o"]],
    5: [],
}
CENTER = 3


def make_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    lat_rows, ctx_rows = [], []
    for lid, kind, born, sel, attr, dens, mean, mx, top in LATENTS:
        edges = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0] if math.isfinite(mx) else []
        counts = [(lid * (i + 3)) % 17 + 1 for i in range(6)] if edges else []
        lat_rows.append({
            "latent": lid, "kind": kind, "born_cycle": born, "times_selected": sel, "attribution": attr,
            "density": dens, "mean_act": mean, "max_act": mx, "hist_edges": edges, "hist_counts": counts,
            "top_logit_tokens": top, "top_logit_values": [2.5 - 0.5 * i for i in range(len(top))],
            "bottom_logit_tokens": [f"neg{i}" for i in range(len(top))],
            "bottom_logit_values": [-1.75 + 0.25 * i for i in range(len(top))],
        })
        for rank, toks in enumerate(WINDOWS[lid]):
            peak = mx / (rank + 1)
            acts = [0.0 if j % 3 == 1 else peak * (0.2 + 0.1 * j) for j in range(len(toks))]
            acts[CENTER] = peak
            ctx_rows.append({"latent": lid, "rank": rank, "tokens": toks, "acts": acts, "center": CENTER,
                             "max_act": peak})
    # contexts arrive out of rank order: the card must sort them
    return pd.DataFrame(lat_rows), pd.DataFrame(ctx_rows[::-1])


def site_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


# ------------------------------------------------------------------------------------------ no browser


def test_files_and_determinism(tmp_path: Path) -> None:
    latents, contexts = make_frames()
    index = write_cards(latents, contexts, tmp_path / "a", META)
    assert index == tmp_path / "a" / "index.html"
    a = site_bytes(tmp_path / "a")
    assert set(a) == {"index.html", *(card_filename(r[0]) for r in LATENTS)}
    # same input, another folder, shuffled row order: identical bytes
    write_cards(latents.sample(frac=1, random_state=1), contexts.sample(frac=1, random_state=2), tmp_path / "b", META)
    assert site_bytes(tmp_path / "b") == a
    # rewriting over an existing site replaces it whole and leaves no temp folders behind
    (tmp_path / "a" / "stale.html").write_text("old")
    write_cards(latents, contexts, tmp_path / "a", META)
    assert site_bytes(tmp_path / "a") == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_index_marks_the_frequency_core(tmp_path: Path) -> None:
    latents, contexts = make_frames()
    marked = latents.assign(in_frequency_core=latents.latent.isin([42, 7]))
    index = write_cards(marked, contexts, tmp_path / "f", META).read_text()
    assert index.count('class="badge frequency"') == 2 and "2 in the frequency control core" in index
    row = next(line for line in index.splitlines() if 'data-latent="42"' in line)
    assert 'data-search="42 ' in row and " frequency " in row.split('data-search="')[1].split('"')[0] + " "
    # without the column the index is as before
    plain = write_cards(latents, contexts, tmp_path / "p", META).read_text()
    assert "frequency" not in plain


def test_escaping_and_exact_values(tmp_path: Path) -> None:
    latents, contexts = make_frames()
    write_cards(latents, contexts, tmp_path / "site", META)
    for name, raw in site_bytes(tmp_path / "site").items():
        text = raw.decode("utf-8")
        assert "<script>window.__pwned" not in text, name
        assert text.count("<script") == 1, name  # only the page's own script
        assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', ""), name
        assert "https://" not in text, name
    card = (tmp_path / "site" / card_filename(42)).read_text()
    assert 'data-density="0.01234"' in card and ">1.23%<" in card
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in card
    assert 'data-attribution="nan"' in (tmp_path / "site" / card_filename(7)).read_text()


def test_interrupted_write_leaves_no_partial_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    latents, contexts = make_frames()
    real = cards._render_card
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(cards, "_render_card", flaky)
    out = tmp_path / "site"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_cards(latents, contexts, out, META)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    # a failing rewrite keeps the previous site intact
    monkeypatch.setattr(cards, "_render_card", real)
    write_cards(latents, contexts, out, META)
    before = site_bytes(out)
    calls["n"] = 0
    monkeypatch.setattr(cards, "_render_card", flaky)
    with pytest.raises(RuntimeError):
        write_cards(latents.assign(kind="core"), contexts, out, META)
    assert site_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["site"]


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    latents, contexts = make_frames()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        write_cards(latents, contexts, tmp_path, META)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_input_is_loud(tmp_path: Path) -> None:
    latents, contexts = make_frames()
    with pytest.raises(ValueError, match="lacks columns"):
        write_cards(latents.drop(columns=["density"]), contexts, tmp_path / "s", META)
    with pytest.raises(ValueError, match="more than once"):
        write_cards(pd.concat([latents, latents.head(1)]), contexts, tmp_path / "s", META)
    bad = contexts.copy()
    bad.at[0, "center"] = 99
    with pytest.raises(ValueError, match="center"):
        write_cards(latents, bad, tmp_path / "s", META)
    assert not (tmp_path / "s").exists()


def test_token_rendering() -> None:
    assert cards.token_html("<b>&") == "&lt;b&gt;&amp;"
    assert cards.token_html(" the") == " the"
    assert cards.token_html(" the", all_spaces=True) == '<span class="ws">␣</span>the'
    assert cards.token_html(" ") == '<span class="ws">␣</span>'
    assert cards.token_html("a\nb") == 'a<span class="ws">↵</span>b'
    assert cards.token_html("\x00") == '<span class="ws">⟨U+0000⟩</span>'
    assert cards.fmt(0.000123456) == "0.000123" and cards.fmt(1234.5) == "1230" and cards.fmt(float("nan")) == "—"
    assert cards.fmt_pct(0.01234) == "1.23%"


# --------------------------------------------------------------------------------------------- browser


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def served_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cards") / "site"
    latents, contexts = make_frames()
    write_cards(latents, contexts, root, META)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: "
                                   "`pip install playwright==1.65.2` (no `playwright install` needed)")
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` or set DMSAE_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that fails the test on any console error, uncaught exception or dialog."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    pg.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    try:
        yield pg
        pg.wait_for_timeout(50)  # let late console messages arrive
        assert problems == []
    finally:
        ctx.close()


def row_ids(page: Any, visible_only: bool = False) -> list[int]:
    sel = "#latents tbody tr" + (":not([hidden])" if visible_only else "")
    return [int(x) for x in page.eval_on_selector_all(sel, "rs => rs.map(r => r.dataset.latent)")]


def expected(key: int) -> dict[str, Any]:
    lid, kind, born, sel, attr, dens, mean, mx, top = next(r for r in LATENTS if r[0] == key)
    return {"kind": kind, "density": dens, "attribution": attr, "top": top}


def test_index_loads_sorts_and_filters(page: Any, served_site: str) -> None:
    page.goto(f"{served_site}/index.html")
    assert "cycle-2" in page.title()
    assert row_ids(page) == sorted(r[0] for r in LATENTS)
    assert page.inner_text("#count") == f"{len(LATENTS)} of {len(LATENTS)} latents shown"
    # exact values ride along in data attributes; the cell shows 3 significant digits
    row42 = page.locator('#latents tbody tr[data-latent="42"]')
    assert row42.get_attribute("data-density") == "0.01234"
    assert "1.23%" in row42.inner_text()
    assert SCRIPT_TOKEN in row42.inner_text()  # a logit token chip, shown as text

    density = page.locator('th[data-key="density"] button')
    density.click()
    assert page.get_attribute('th[data-key="density"]', "aria-sort") == "descending"
    by_density = sorted(LATENTS, key=lambda r: r[5])
    assert row_ids(page) == [r[0] for r in reversed(by_density)]
    density.click()
    assert page.get_attribute('th[data-key="density"]', "aria-sort") == "ascending"
    assert row_ids(page) == [r[0] for r in by_density]
    # a missing attribution sorts last in either direction
    page.click('th[data-key="attribution"] button')
    ids = row_ids(page)
    assert ids[-1] == 7 and ids[:-1] == [r[0] for r in sorted(LATENTS[:1] + LATENTS[2:], key=lambda r: -r[4])]
    assert page.get_attribute('th[data-key="density"]', "aria-sort") == "none"

    page.fill("#q", "the")
    assert sorted(row_ids(page, visible_only=True)) == [3, 42]
    assert page.inner_text("#count") == f"2 of {len(LATENTS)} latents shown"
    assert page.locator('#latents tbody tr[data-latent="7"]').is_hidden()
    page.fill("#q", "#100")
    assert row_ids(page, visible_only=True) == [100]
    page.fill("#q", "")
    page.select_option("#kind", "core")
    assert sorted(row_ids(page, visible_only=True)) == sorted(r[0] for r in LATENTS if r[1] == "core")
    page.fill("#q", "dog")
    assert row_ids(page, visible_only=True) == [3]
    page.select_option("#kind", "non-core")
    assert row_ids(page, visible_only=True) == []
    page.select_option("#kind", "all")
    page.fill("#q", "")
    assert len(row_ids(page, visible_only=True)) == len(LATENTS)


def test_card_from_index(page: Any, served_site: str) -> None:
    page.goto(f"{served_site}/index.html")
    page.click('#latents tbody tr[data-latent="42"] a')
    page.wait_for_url(f"**/{card_filename(42)}")
    assert page.get_attribute("#card", "data-latent") == "42"
    assert page.inner_text("h1").startswith("Latent 42")
    assert page.get_attribute("#card", "data-kind") == "core"
    assert page.get_attribute("#stat-density", "data-value") == "0.01234"
    assert page.inner_text("#stat-density") == "1.23%"
    assert page.locator("svg.hist rect").count() == 6
    assert page.locator("table.logits.pos tbody tr").count() == 3
    assert page.locator("table.logits.neg tbody tr").count() == 3

    contexts = page.locator("ol.contexts li.ctx")
    assert contexts.count() == len(WINDOWS[42])
    assert [int(r) for r in contexts.evaluate_all("ls => ls.map(l => l.dataset.rank)")] == [0, 1]
    top = contexts.nth(0)
    max_tok = top.locator(".t.max")
    assert max_tok.count() == 1
    # the max token is the hostile one, and it is shown as text: no script ran
    assert max_tok.get_attribute("data-token") == SCRIPT_TOKEN
    assert max_tok.inner_text() == SCRIPT_TOKEN
    assert page.evaluate("window.__pwned") is None
    assert max_tok.get_attribute("data-act") == repr(6.0)
    assert repr(6.0) in max_tok.get_attribute("title")
    style = max_tok.evaluate("e => { const s = getComputedStyle(e); return [s.fontWeight, s.textDecorationLine, "
                             "s.backgroundColor]; }")
    assert int(style[0]) >= 700 and "underline" in style[1] and style[2] == "rgba(255, 122, 0, 0.85)"
    # a zero activation is not shaded; whitespace tokens are visible glyphs
    tokens = top.locator(".t")
    assert tokens.nth(1).evaluate("e => getComputedStyle(e).backgroundColor") == "rgba(0, 0, 0, 0)"
    assert tokens.nth(5).inner_text() == "␣" and tokens.nth(6).inner_text() == "↵"
    assert contexts.nth(1).locator(".t.max").get_attribute("data-token") == " the"


def test_card_navigation_and_edge_cases(page: Any, served_site: str) -> None:
    ids = sorted(r[0] for r in LATENTS)
    page.goto(f"{served_site}/{card_filename(ids[0])}")
    assert page.locator('nav.pager a[rel="prev"]').count() == 0
    for want in ids[1:]:
        page.click('nav.pager a[rel="next"]')
        page.wait_for_url(f"**/{card_filename(want)}")
        assert page.get_attribute("#card", "data-latent") == str(want)
        assert page.locator("ol.contexts li.ctx").count() == len(WINDOWS[want])
    assert page.locator('nav.pager a[rel="next"]').count() == 0
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(f"**/{card_filename(ids[-2])}")
    # latent 5: never fired, no contexts, unknown mean/max
    page.goto(f"{served_site}/{card_filename(5)}")
    assert "No contexts recorded" in page.inner_text("main")
    assert page.locator("svg.hist").count() == 0
    assert page.inner_text("#stat-max-act") == "—"
    page.click('nav.pager a[href="index.html"]')
    page.wait_for_url("**/index.html")
    assert len(row_ids(page)) == len(LATENTS)
