"""The interpret stages on the tiny pipeline: the latent cards' data checked against numbers recomputed
from the stored SAE, the site written from it, and caching."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dmsae import lm, readers
from dmsae.eval import probing

INTERPRET = ["interpret.enabled=true", "interpret.cards_noncore=5", "interpret.probe_examples=40", "reuse.k=[4,8]"]


@pytest.fixture(scope="module")
def interpreted(make_config, pipeline_runner, tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("interpret")
    cfg = make_config(root / "store", f"report_dir={root / 'reports'}", *INTERPRET)
    with single_thread():
        return pipeline_runner(cfg)


def test_a_rerun_computes_nothing_and_a_new_sae_only_its_own(interpreted, make_config, pipeline_runner,
                                                             single_thread):
    store = interpreted.store.root
    with single_thread():
        again = pipeline_runner(make_config(store, *INTERPRET))
        assert not any(again.computed.values())
        more = pipeline_runner(make_config(store, *INTERPRET[:-1], "reuse.k=[4,8,12]"))
    new = sorted(label for label, computed in more.computed.items() if computed)
    assert new == sorted(f"{stage}[{arm},k=12,seed=0]" for stage in ("reuse", "evaluate", "interpret")
                         for arm in ("distilled", "random", "none"))


def test_cards_command_writes_the_site_and_the_report_links_it(interpreted, make_config, tmp_path, capsys):
    import yaml

    from flows.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(interpreted.cfg.model_dump(mode="json")))
    out = tmp_path / "site"
    assert main(["cards", str(config), "--out", str(out), "--no-progress"]) == 0
    n_cards = len(pd.read_parquet(interpreted.load("latents").file(readers.LATENTS_FILE)))
    assert (out / "index.html").is_file() and len(list(out.glob("latent-*.html"))) == n_cards
    assert main(["report", str(config), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Absorption and sparse probing" in summary and "latents/index.html" in summary
    report = tmp_path / "report"
    assert (report / "latents" / "index.html").is_file() and (report / "interpret.png").is_file()
    # without the finished distillation the cards refuse in one line
    capsys.readouterr()
    assert main(["cards", str(config), "--set", "seed=9", "--no-progress"]) == 2
    assert "run it first" in capsys.readouterr().err


def test_every_evaluated_sae_is_interpreted(interpreted):
    run = interpreted
    evaluated = {n.label.removeprefix("evaluate") for n in run.plan.of_stage("evaluate")}
    interpreted_saes = {n.label.removeprefix("interpret") for n in run.plan.of_stage("interpret")}
    assert evaluated == interpreted_saes and len(evaluated) == 2 + 3 * 2 + 2 * 3 - 3 + 2  # + the two controls
    probes = run.load("probes").metrics
    assert probes["n_words"] == 0  # the tiny word-level vocabulary ("w00".."w99") has no alphabetic words
    for node in run.plan.of_stage("interpret"):
        m = run.store.load(node.stage, node.key).metrics
        assert m["absorption_fraction"] is None and "letters" in m["absorption_note"]
        assert 0.0 <= m["sparse_probe_k1"] <= 1.0


def card_values(page: str) -> dict[str, float]:
    """The exact numbers a card page carries on its <main> element (data-density, data-max-act, ...) and its
    strongest context's maximum."""
    main = re.search(r'<main id="card"([^>]*)>', page).group(1)
    values = {k: float(v) for k, v in re.findall(r'data-([a-z-]+)="([-0-9.e+naif]+)"', main)}
    values["top-context-max"] = float(re.search(r'data-rank="0" data-max-act="([^"]+)"', page).group(1))
    return values


def test_card_numbers_match_a_recomputation_from_the_stored_sae(interpreted, tmp_path):
    from dmsae.reports.run import render_cards
    from flows.pipeline import cards_node

    run = interpreted
    node = cards_node(run.cfg, run.plan.nodes)
    site = render_cards(run.cfg, node, run.store.load(node.stage, node.key), tmp_path / "site").parent
    cards = run.load("latents")
    table = pd.read_parquet(cards.file(readers.LATENTS_FILE))
    contexts = pd.read_parquet(cards.file(readers.CONTEXTS_FILE))
    core = load_file(str(run.load("select[1]").file(readers.CORE_FILE)))["indices"].tolist()
    assert table["latent"].tolist()[: len(core)] == core and (table["kind"][: len(core)] == "core").all()
    assert (table["kind"][len(core):] == "non-core").sum() == 5

    # recompute with plain tensor maths from the files: ReLU((x - b_dec) W_enc + b_enc), kept above threshold
    sae_art, harvest = run.load("train[1]"), run.load("harvest")
    t = load_file(str(sae_art.file(readers.SAE_FILE)))
    scale = harvest.metrics["scale"]
    model = lm.load_model(run.load("model").path)
    windows = load_file(str(run.load("tokens").file(readers.TOKENS_FILE)))["eval"].long()
    bos = run.load("tokens").metrics["bos_id"]
    h = lm.residual_upto(model, windows, run.cfg.harvest.layer)
    kept = lm.kept_positions(h, windows, bos, readers.norm_threshold_of(harvest))
    pre = torch.relu((h.float() * scale - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    codes = torch.where(pre > t["threshold"], pre, torch.zeros_like(pre)) * kept[..., None]
    for latent in table["latent"].sample(3, random_state=0).tolist():
        row = table.set_index("latent").loc[latent]
        acts = codes[..., latent]
        assert row["density"] == pytest.approx(float((acts > 0).sum()) / float(kept.sum()), rel=1e-6)
        assert row["max_act"] == pytest.approx(float(acts.max()), rel=1e-4)
        top = contexts[(contexts["latent"] == latent) & (contexts["rank"] == 0)].iloc[0]
        card = card_values((site / f"latent-{latent}.html").read_text(encoding="utf-8"))
        assert card["density"] == pytest.approx(float((acts > 0).sum()) / float(kept.sum()), rel=1e-6)
        assert card["max-act"] == pytest.approx(float(acts.max()), rel=1e-4) == card["top-context-max"]
        assert top["max_act"] == pytest.approx(float(acts.max()), rel=1e-4)
        assert top["acts"][top["center"]] == top["max_act"]


def test_core_decoder_stability_across_reuse_k(interpreted):
    from dmsae.reports.run import core_decoder_stability

    run = interpreted
    table = core_decoder_stability(run.store, run.plan, run.cfg).set_index("k")
    assert list(table.index) == [4, 8] and (table["reference_k"] == 8).all()  # sae.k=6 is not reused: middle k
    assert table.loc[8, "mean_cosine"] == pytest.approx(1.0) and table.loc[8, "share_above_0.9"] == 1.0
    decs = {k: load_file(str(run.load(f"reuse[distilled,k={k},seed=0]").file(readers.SAE_FILE)))["W_dec"]
            for k in (4, 8)}
    c = int(table.loc[4, "core_size"])
    a, b = decs[4][:c].double(), decs[8][:c].double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert table.loc[4, "mean_cosine"] == pytest.approx(float(cos.mean())) and c > 0
    assert table.loc[4, "min_cosine"] == pytest.approx(float(cos.min()))
    # latent by latent, keyed by the latent's index in the last cycle's SAE (as on its card)
    from dmsae.reports.run import core_decoder_cosines

    per_latent = core_decoder_cosines(run.store, run.plan, run.cfg)
    at4 = per_latent[per_latent.k == 4]
    core = load_file(str(run.load("select[1]").file(readers.CORE_FILE)))["indices"].tolist()
    assert at4.latent.tolist() == core and at4.cosine.tolist() == pytest.approx(cos.tolist())


def test_probing_without_core_keeps_the_stage_numbers_and_leaves_the_core_out(interpreted):
    from safetensors.torch import load_file as load_tensors

    from dmsae.reports.ablation import probing_without_core

    run = interpreted
    table = probing_without_core(run.cfg, run.store, run.plan, ks=(1, 5))
    cored = [n for n in run.plan.of_stage("interpret")
             if n.inputs["sae"].stage == "reuse" and n.inputs["sae"].params["arm"] not in ("none", "none_compute")]
    assert len(table) == 2 * len(cored) and set(table.arm) == {"distilled", "random", "frequency"}
    for node in cored:
        stage_metrics = run.store.load(node.stage, node.key).metrics
        sae_art = run.store.load("reuse", node.inputs["sae"].key)
        params = node.inputs["sae"].params
        rows = table[(table.arm == params["arm"]) & (table.k == sae_art.metrics["k"]) & (table.seed == params["seed"])]
        # every latent a candidate: exactly the interpret stage's own score
        for k in (1, 5):
            assert rows[rows.probe_k == k].accuracy_all_latents.item() == pytest.approx(
                stage_metrics[f"sparse_probe_k{k}"], abs=1e-12)
        # the core left out: no chosen latent is a core latent, and the indices are the SAE's own
        sae, scale = readers.load_sae(sae_art)
        probes = run.store.load("probes", node.inputs["probes"].key)
        data = load_tensors(str(probes.file(readers.PROBES_TENSORS_FILE)))
        features = probing.pooled(data["text_residuals"], data["text_offsets"],
                                       probing.encoder(sae, scale))
        without = probing.sparse_probing(features, readers.probe_tasks(probes), (1, 5), skip_latents=sae.core_size)
        chosen = [i for lat in without.latents for i in lat]
        assert sae.core_size and chosen and min(chosen) >= sae.core_size
        # independently: the whole dictionary ranked on the train split, core latents dropped, the first five
        for (task, ids, labels, is_test), lat in zip(readers.probe_tasks(probes),
                                                     without[without.k == 5].latents, strict=True):
            train = ~torch.tensor(is_test)
            order = probing.rank_latents(features[ids][train], torch.tensor(labels)[train]).tolist()
            assert list(lat) == [i for i in order if i >= sae.core_size][:5], task
        stored = pd.read_parquet(run.store.load(node.stage, node.key).file(readers.SPARSE_PROBING_FILE))
        again = probing.sparse_probing(features, readers.probe_tasks(probes), (1, 2, 5, 10))
        assert again.test_accuracy.tolist() == stored.test_accuracy.tolist()
        assert [list(x) for x in again.latents] == [list(x) for x in stored.latents]
