"""The reuse stage and its controls (docs/design.md section 2, Controls): the distilled, random, frequency and
no-core arms at one k differ only in their frozen core; the random core is a uniform draw from the cycle-0 SAE;
the frequency core is the most often firing candidates of the last cycle's SAE; the compute-matched no-core arm
trains as many tokens as the distillation; and the plan keys of the reuse nodes follow exactly the settings they
depend on, the controls adding nodes without changing any other."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

ARMS = ("distilled", "random", "none")
CONTROLS = ("frequency", "none_compute")  # at the reference k (8: sae.k=6 is not reused) and seed 0 only
WIDTH = 128
D_MODEL = 64


def sae_tensors(art) -> dict[str, torch.Tensor]:
    return load_file(str(art.file("sae.safetensors")))


def core_tensors(art) -> dict[str, torch.Tensor]:
    return load_file(str(art.file("core.safetensors")))


def arm_nodes(run, k: int, seed: int = 0) -> dict[str, object]:
    return {arm: run.node(f"reuse[{arm},k={k},seed={seed}]") for arm in ARMS}


def test_reuse_plan_has_three_arms_per_k_a_second_seed_and_the_controls(reuse_run):
    labels = [n.label for n in reuse_run.plan.of_stage("reuse")]
    expected = [f"reuse[{arm},k={k},seed={s}]" for k, s in ((4, 0), (8, 0), (8, 1)) for arm in ARMS]
    assert labels == expected + [f"reuse[{arm},k=8,seed=0]" for arm in CONTROLS]
    assert all(reuse_run.computed[label] for label in labels)
    final = reuse_run.node("select[1]")
    for (k, s) in ((4, 0), (8, 0), (8, 1)):
        nodes = arm_nodes(reuse_run, k, s)
        assert nodes["distilled"].inputs["core"].key == final.key
        assert nodes["random"].inputs["core"].stage == "random_core"
        assert "core" not in nodes["none"].inputs
        assert {n.inputs["harvest"].key for n in nodes.values()} == {reuse_run.node("harvest").key}


@pytest.mark.parametrize("k,seed", [(4, 0), (8, 0), (8, 1)])
def test_arms_share_seed_training_settings_and_sae_settings(reuse_run, k, seed):
    nodes = arm_nodes(reuse_run, k, seed)
    params = {arm: dict(n.params) for arm, n in nodes.items()}
    assert {p.pop("arm") for p in params.values()} == set(ARMS)
    assert params["distilled"] == params["random"]
    # the no-core arm's key leaves out the fields that only concern a core; the rest is the same
    from flows.pipeline import CORE_ONLY_SAE_FIELDS

    assert {**params["none"], "sae": None} == {**params["random"], "sae": None}
    assert params["none"]["sae"] == {k_: v for k_, v in params["random"]["sae"].items()
                                     if k_ not in CORE_ONLY_SAE_FIELDS}
    assert params["none"]["seed"] == seed and params["none"]["sae"]["k"] == k
    metrics = {arm: reuse_run.store.manifest("reuse", n.key).metrics for arm, n in nodes.items()}
    assert {m["seed"] for m in metrics.values()} == {seed}
    assert {m["k"] for m in metrics.values()} == {k}
    n_tokens = reuse_run.artifact("harvest").metrics["n_tokens"]  # non-BOS training tokens
    assert {m["steps"] for m in metrics.values()} == {n_tokens // 64}  # one epoch in batches of 64, every arm


@pytest.fixture(scope="module")
def init_saes(reuse_run):
    """The three arms' SAEs at k=8, seed 0, as built (untrained) with the seed the reuse stage uses."""
    from dmsae import training

    nodes = arm_nodes(reuse_run, 8)
    cores = {"distilled": core_tensors(reuse_run.load("select[1]"))["encoder"],
             "random": core_tensors(reuse_run.load("random_core[seed=0]"))["encoder"], "none": None}
    seed = training.derive_seed(0, "reuse")
    return {arm: training.build_sae(nodes[arm].params["sae"], D_MODEL, cores[arm], seed) for arm in ARMS}


def test_arms_start_from_the_same_non_core_initialisation(init_saes):
    dist, rand, none = init_saes["distilled"], init_saes["random"], init_saes["none"]
    c = dist.core_size
    assert 0 < c < WIDTH and rand.core_size == c and none.core_size == 0
    assert not torch.equal(dist.enc_core, rand.enc_core)  # the cores differ
    # distilled and random: identical non-core encoder, decoder, biases and core decoder init
    for name in ("enc", "dec", "b_enc", "b_dec", "dec_core", "b_enc_core", "threshold"):
        assert torch.equal(getattr(dist, name), getattr(rand, name)), name
    # none: its latents c..width are the core arms' non-core latents
    assert torch.equal(none.dec[c:], dist.dec)
    assert torch.equal(none.enc[:, c:], dist.enc)
    assert torch.equal(none.dec[:c], dist.dec_core)  # one draw of the whole decoder for every arm
    assert torch.equal(dist.enc, dist.dec.T)  # fresh latents: W_enc = W_dec^T
    norms = none.dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


@pytest.mark.parametrize("arm", ARMS)
def test_arm_artifact_was_trained_from_that_initialisation(reuse_run, tmp_path, single_thread, arm):
    """Refitting an arm with the seed derive_seed(seed, 'reuse') (what build_sae and shuffled_batches got
    above) and the arm's core gives the stored SAE: the init and batches compared above are the stage's."""
    from dmsae import training
    from dmsae.runtime import Runtime

    node = reuse_run.node(f"reuse[{arm},k=4,seed=0]")
    core = {"distilled": reuse_run.load("select[1]"), "random": reuse_run.load("random_core[seed=0]"),
            "none": None}[arm]
    seed = training.derive_seed(0, "reuse")
    with single_thread():  # as the stored SAE was trained
        training.fit(tmp_path, reuse_run.artifact("harvest"), core, node.params["sae"], node.params["train"],
                        seed, -1, Runtime(show_progress=False))
    refit = load_file(str(tmp_path / "sae.safetensors"))
    stored = sae_tensors(reuse_run.store.load("reuse", node.key))
    for name in stored:
        assert torch.equal(refit[name], stored[name]), name
    # the train stage's seed for the same user seed gives another SAE
    assert training.derive_seed(0, "reuse") != training.derive_seed(0, "train", 0)
    assert not torch.equal(sae_tensors(reuse_run.artifact("train", 0))["W_dec"], stored["W_dec"])


def test_arms_see_the_same_batches(reuse_run):
    from dmsae import activations, training

    harvest = reuse_run.artifact("harvest")
    array = activations.open_array(harvest.file(activations.ARRAY))
    scale = harvest.metrics["scale"]
    rows = (torch.from_numpy(array[:].astype(np.float32)) * scale).numpy()  # the same float32 product
    n_steps = rows.shape[0] // 64  # one epoch

    def first_batches(node, seed_offset: int = 0) -> list[torch.Tensor]:
        tp = node.params["train"]
        seed = training.derive_seed(node.params["seed"] + seed_offset, "reuse")
        gen = activations.shuffled_batches(array, tp["batch_size"], tp["shuffle_chunks"], seed, scale)
        return list(itertools.islice(gen, n_steps))

    nodes = arm_nodes(reuse_run, 8)
    streams = {arm: first_batches(n) for arm, n in nodes.items()}
    for arm in ("random", "none"):
        assert all(torch.equal(a, b) for a, b in zip(streams["distilled"], streams[arm], strict=True)), arm
    # one epoch of batches is a permutation of the (scaled) harvested rows, minus the remainder
    seen = torch.cat(streams["distilled"]).numpy()
    assert seen.shape == (n_steps * 64, D_MODEL)
    assert rows.shape[0] - 64 < seen.shape[0] <= rows.shape[0]
    # as multisets: equal rows do occur (the same word right after BOS has the same residual)
    all_rows = Counter(r.tobytes() for r in rows)
    seen_rows = Counter(r.tobytes() for r in seen)
    assert not seen_rows - all_rows  # every row at most as often as it was harvested
    assert sum((all_rows - seen_rows).values()) == rows.shape[0] - seen.shape[0]
    # another seed gives another order
    other = first_batches(nodes["none"], seed_offset=1)
    assert not torch.equal(other[0], streams["none"][0])


@pytest.mark.parametrize("k,seed", [(4, 0), (8, 0), (8, 1)])
def test_trained_arms_keep_their_core_encoder_frozen(reuse_run, k, seed):
    final = core_tensors(reuse_run.load("select[1]"))
    rand = core_tensors(reuse_run.load("random_core[seed=0]"))
    c = final["encoder"].shape[1]
    arts = {arm: reuse_run.store.load("reuse", n.key) for arm, n in arm_nodes(reuse_run, k, seed).items()}
    t = {arm: sae_tensors(a) for arm, a in arts.items()}
    assert torch.equal(t["distilled"]["W_enc"][:, :c], final["encoder"])
    assert torch.equal(t["random"]["W_enc"][:, :c], rand["encoder"])
    assert not torch.equal(t["distilled"]["W_enc"][:, :c], t["random"]["W_enc"][:, :c])
    assert {arm: a.metrics["core_size"] for arm, a in arts.items()} == {"distilled": c, "random": c, "none": 0}
    for arm in ARMS:
        assert t[arm]["W_enc"].shape == (D_MODEL, WIDTH)
    # lineage: the core keeps its ids, everything else is born in the reuse SAE (cycle -1)
    lin = {arm: load_file(str(a.file("lineage.safetensors")))["lineage"] for arm, a in arts.items()}
    assert torch.equal(lin["distilled"][:c], final["lineage"])
    assert torch.equal(lin["random"][:c], rand["lineage"])
    for arm in ("distilled", "random"):
        assert (lin[arm][c:, 0] == -1).all() and torch.equal(lin[arm][c:, 1], torch.arange(c, WIDTH))
    assert (lin["none"][:, 0] == -1).all() and torch.equal(lin["none"][:, 1], torch.arange(WIDTH))


# -- random core ---------------------------------------------------------------------------------------


def test_random_core_is_drawn_from_the_cycle0_sae(reuse_run):
    from stages.random_core import draw_indices

    node = reuse_run.node("random_core[seed=0]")
    assert node.inputs["cycle0"].key == reuse_run.node("train[0]").key
    assert node.inputs["core"].key == reuse_run.node("select[1]").key
    rc = core_tensors(reuse_run.store.load("random_core", node.key))
    final_size = reuse_run.artifact("select", 1).metrics["core_size"]
    idx = rc["indices"]
    assert idx.numel() == final_size > 0
    assert len(set(idx.tolist())) == final_size
    assert idx.tolist() == sorted(idx.tolist())
    assert 0 <= int(idx.min()) and int(idx.max()) < WIDTH
    cycle0 = sae_tensors(reuse_run.artifact("train", 0))
    live = (cycle0["threshold"] < 1e38).nonzero().squeeze(1)  # latents that fired in cycle-0 training
    assert live.numel() >= final_size
    assert set(idx.tolist()) <= set(live.tolist())
    assert torch.equal(draw_indices(live, final_size, 0), idx)  # deterministic for the seed
    assert not torch.equal(draw_indices(live, final_size, 1), idx)  # another seed, another core
    assert torch.equal(rc["encoder"], cycle0["W_enc"][:, idx])
    assert torch.equal(rc["lineage"], torch.stack([torch.zeros_like(idx), idx], dim=1))
    # the birth bias and threshold travel with the rows (relu_bias uses them)
    assert torch.equal(rc["bias"], cycle0["b_enc"][idx]) and torch.equal(rc["threshold"], cycle0["threshold"][idx])
    assert reuse_run.store.manifest("random_core", node.key).metrics == {"core_size": final_size, "seed": 0,
                                                                        "n_live": live.numel()}


def test_random_core_indices_are_uniform():
    """Over many seeds every index is drawn about size/width of the time (a chi-square bound)."""
    from stages.random_core import draw_indices

    width, size, n_seeds = 32, 5, 4000
    counts = np.zeros(width)
    for s in range(n_seeds):
        idx = draw_indices(torch.arange(width), size, s).numpy()
        assert len(np.unique(idx)) == size
        counts[idx] += 1
    expected = n_seeds * size / width
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70, (chi2, counts)  # df = 31: p < 1e-4 above 70
    # and it is not biased towards the first latents (a prefix would fail this)
    assert counts[: width // 2].sum() == pytest.approx(counts[width // 2:].sum(), rel=0.1)


# -- plan keys -----------------------------------------------------------------------------------------


def reuse_keys(make_config, store, *overrides: str) -> dict[str, str]:
    from flows.pipeline import plan

    p = plan(make_config(store, "reuse.k=[4, 8]", "reuse.consistency_seeds=[0, 1]", *overrides))
    return {n.label: n.key for n in p.nodes if n.stage in ("reuse", "random_core", "baseline", "evaluate")}


def test_plan_reuse_keys_ignore_runtime_settings(make_config, tmp_path):
    base = reuse_keys(make_config, tmp_path / "a")
    # random core, baseline, reuse SAEs, cycle + reuse evaluations, the two controls' SAEs and evaluations
    assert len(base) == 1 + 1 + 9 + 2 + 9 + 2 + 2
    same = reuse_keys(make_config, tmp_path / "b", "name=other", "report_dir=elsewhere", "threads=1",
                      "evaluation.batch_size=3", "attribution.batch_size=2", "data.batch_size=5",
                      "train.checkpoint_every=7")
    assert same == base


def test_plan_reuse_keys_follow_reuse_k(make_config, tmp_path):
    base = reuse_keys(make_config, tmp_path)
    other = reuse_keys(make_config, tmp_path, "reuse.k=[4, 16]")
    for arm in ARMS:
        assert other[f"reuse[{arm},k=4,seed=0]"] == base[f"reuse[{arm},k=4,seed=0]"]  # k=4 is shared: cached
        assert other[f"reuse[{arm},k=16,seed=0]"] not in base.values()
        assert other[f"reuse[{arm},k=16,seed=1]"] not in base.values()
    assert other["random_core[seed=0]"] == base["random_core[seed=0]"]
    assert other["baseline"] == base["baseline"]


def test_plan_random_core_seed_changes_only_the_random_arm(make_config, tmp_path):
    base = reuse_keys(make_config, tmp_path)
    other = reuse_keys(make_config, tmp_path, "reuse.random_core_seed=3")
    assert "random_core[seed=3]" in other and other["random_core[seed=3]"] != base["random_core[seed=0]"]
    for (k, s) in ((4, 0), (8, 0), (8, 1)):
        for stage in ("reuse", "evaluate"):
            label = f"{stage}[random,k={k},seed={s}]"
            assert other[label] != base[label], label
            for arm in ("distilled", "none"):
                label = f"{stage}[{arm},k={k},seed={s}]"
                assert other[label] == base[label], label


def test_plan_tau_changes_the_core_arms_but_not_the_none_arm(make_config, tmp_path):
    base = reuse_keys(make_config, tmp_path)
    other = reuse_keys(make_config, tmp_path, "selection.tau=0.5")
    assert other["random_core[seed=0]"] != base["random_core[seed=0]"]  # its size follows the final core
    for (k, s) in ((4, 0), (8, 0), (8, 1)):
        for stage in ("reuse", "evaluate"):
            for arm in ("distilled", "random"):
                assert other[f"{stage}[{arm},k={k},seed={s}]"] != base[f"{stage}[{arm},k={k},seed={s}]"]
            assert other[f"{stage}[none,k={k},seed={s}]"] == base[f"{stage}[none,k={k},seed={s}]"]
    assert other["baseline"] == base["baseline"]
    assert other["evaluate[cycle=0]"] == base["evaluate[cycle=0]"]  # train[0] does not depend on tau
    assert other["evaluate[cycle=1]"] != base["evaluate[cycle=1]"]


def test_plan_dense_threshold_changes_evaluations_only(make_config, tmp_path):
    base = reuse_keys(make_config, tmp_path)
    other = reuse_keys(make_config, tmp_path, "evaluation.dense_threshold=0.2")
    for label, key in base.items():
        if label.startswith("evaluate["):
            assert other[label] != key, label
        else:
            assert other[label] == key, label


# -- the controls: frequency core and compute-matched no core ---------------------------------------------


def test_frequency_core_equals_an_independent_count(reuse_run, tiny_model_dir):
    """The frequency core recounted without dmsae's model or SAE code: the model's own hidden states after the
    layer, the positions attribution splices (not BOS, not above the outlier threshold), the SAE's inference
    code from its stored tensors, and the candidates' firing counts sorted descending (ties by index)."""
    from transformers import AutoModelForCausalLM

    node = reuse_run.node("frequency_core")
    train_last = reuse_run.node("train[1]")
    assert node.inputs["train"].key == train_last.key and node.inputs["core"].key == reuse_run.node("select[1]").key
    art = reuse_run.store.load("frequency_core", node.key)
    stored = core_tensors(art)
    sae_art = reuse_run.store.load("train", train_last.key)
    t = sae_tensors(sae_art)
    n_inner = sae_art.metrics["core_size"] + sae_art.metrics["group_ends"][0]
    scale = sae_art.metrics["scale"]
    windows = load_file(str(reuse_run.artifact("tokens").file("tokens.safetensors")))["attribution"].long()
    harvest = reuse_run.artifact("harvest")
    limit = harvest.metrics.get("norm_threshold") or float("inf")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    counts = torch.zeros(n_inner, dtype=torch.long)
    n_tok = 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], 5):
            ids = windows[i:i + 5]
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[reuse_run.cfg.harvest.layer + 1]
            keep = (ids != 1) & (h.norm(dim=-1) <= limit)
            x = h[keep] * scale
            pre = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
            code = torch.where(pre > t["threshold"], pre, torch.zeros_like(pre))[:, :n_inner]
            counts += (code > 0).sum(0)
            n_tok += x.shape[0]
    assert torch.equal(stored["counts"], counts)
    size = reuse_run.artifact("select", 1).metrics["core_size"]
    order = sorted(range(n_inner), key=lambda j: (-int(counts[j]), j))
    assert stored["indices"].tolist() == order[:size] and size > 0
    assert torch.equal(stored["encoder"], t["W_enc"][:, stored["indices"]])
    lineage = load_file(str(sae_art.file("lineage.safetensors")))
    assert torch.equal(stored["lineage"], lineage["lineage"][stored["indices"]])
    m = art.metrics
    assert m["core_size"] == size and m["n_tokens"] == n_tok and m["n_candidates"] == n_inner
    distilled = set(core_tensors(reuse_run.load("select[1]"))["indices"].tolist())
    assert m["shared_with_distilled"] == len(distilled & set(order[:size]))
    # and the frequency arm freezes exactly those rows
    arm = sae_tensors(reuse_run.load("reuse[frequency,k=8,seed=0]"))
    assert torch.equal(arm["W_enc"][:, :size], stored["encoder"])


def test_compute_matched_arm_trains_as_many_tokens_as_the_distillation(reuse_run):
    cycles = [reuse_run.artifact("train", c).metrics["tokens"] for c in range(reuse_run.cfg.cycles)]
    own = reuse_run.load("reuse[distilled,k=8,seed=0]").metrics["tokens"]
    m = reuse_run.load("reuse[none_compute,k=8,seed=0]").metrics
    assert m["tokens"] == sum(cycles) + own == (reuse_run.cfg.cycles + 1) * own
    assert m["trainings"] == reuse_run.cfg.cycles + 1 and m["core_size"] == 0
    curve = pd.read_parquet(reuse_run.load("reuse[none_compute,k=8,seed=0]").file("curve.parquet"))
    assert int(curve.tokens.iloc[-1]) == m["tokens"]


def test_controls_are_paired_with_the_arms_they_control(reuse_run, init_saes):
    """For seed 0 at k=8: the frequency arm differs from the distilled arm only in its core's rows (same size, so
    the same init of every other parameter and the same batches); none_compute is the no-core arm's SAE settings,
    seed and init, trained longer on the same stream."""
    from dmsae import training

    nodes = {arm: reuse_run.node(f"reuse[{arm},k=8,seed=0]") for arm in (*ARMS, *CONTROLS)}
    params = {arm: dict(n.params) for arm, n in nodes.items()}
    assert params["none_compute"].pop("trainings") == reuse_run.cfg.cycles + 1
    for p in params.values():
        p.pop("arm")
    assert params["frequency"] == params["distilled"] and params["none_compute"] == params["none"]
    seed = training.derive_seed(0, "reuse")
    freq = training.build_sae(params["frequency"]["sae"], D_MODEL,
                              core_tensors(reuse_run.load("frequency_core"))["encoder"], seed)
    dist = init_saes["distilled"]
    assert freq.core_size == dist.core_size
    for name in ("enc", "dec", "b_enc", "b_dec", "dec_core", "b_enc_core", "threshold"):
        assert torch.equal(getattr(freq, name), getattr(dist, name)), name


def test_controls_add_nodes_without_changing_any_key(make_config, tmp_path):
    """A store made before the controls existed is reused whole: the plan without them is the plan with them
    minus the new nodes, key for key (and minus a random core when the random arm is off)."""
    from flows.pipeline import plan

    overrides = ("reuse.k=[4, 8]", "reuse.consistency_seeds=[0, 1]", "interpret.enabled=true")
    full = {n.label: n.key for n in plan(make_config(tmp_path, *overrides)).nodes}
    before = {n.label: n.key for n in plan(make_config(tmp_path, *overrides,
                                                       "reuse.arms=[distilled, random, none]")).nodes}
    assert before.items() <= full.items()
    added = sorted(set(full) - set(before))
    assert added == sorted(["frequency_core", *(f"{stage}[{arm},k=8,seed=0]" for arm in CONTROLS
                                                for stage in ("reuse", "evaluate", "interpret"))])
    only_distilled = {n.label: n.key for n in plan(make_config(tmp_path, *overrides, "reuse.arms=[distilled]")).nodes}
    assert only_distilled.items() <= full.items() and "random_core[seed=0]" not in only_distilled
    assert not any(",k=" in label and not label.split("[")[1].startswith("distilled") for label in only_distilled)
    # control_k moves the controls only
    at4 = {n.label: n.key for n in plan(make_config(tmp_path, *overrides, "reuse.control_k=[4, 8]")).nodes}
    assert full.items() <= at4.items()
    assert {"reuse[frequency,k=4,seed=0]", "reuse[none_compute,k=4,seed=0]"} <= set(at4) - set(full)
    # none_compute is shared by every gate (no core, its budget depends on the cycles only)
    relu = {n.label: n.key for n in plan(make_config(tmp_path, *overrides, "sae.core_gate=relu")).nodes}
    assert relu["reuse[none_compute,k=8,seed=0]"] == full["reuse[none_compute,k=8,seed=0]"]
    assert relu["reuse[frequency,k=8,seed=0]"] != full["reuse[frequency,k=8,seed=0]"]


@pytest.mark.parametrize("override,field", [
    ("reuse.control_k=[5]", "control_k"),
    ("reuse.arms=[distilled, magnitude]", "reuse.arms"),
    ("reuse.arms=[distilled, distilled]", "reuse.arms"),
])
def test_an_arm_the_run_cannot_produce_is_refused_in_one_line(reuse_config_yaml, tmp_path, capsys, override, field):
    from flows.cli import main

    assert main(["check", str(reuse_config_yaml), "--set", override, "--set", f"store={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err


def test_control_arms_without_reuse_k_are_refused(make_config, tmp_path):
    from dmsae.errors import UserError

    with pytest.raises(UserError, match="reuse.k is empty") as e:
        make_config(tmp_path, "reuse.arms=[distilled, frequency]")
    assert "\n" not in str(e.value) and "arms" in str(e.value)
    make_config(tmp_path)  # the default arms with no reuse.k: nothing to train, nothing refused


def test_status_and_check_show_the_controls(reuse_config_yaml, capsys):
    from flows.cli import main

    assert main(["status", str(reuse_config_yaml)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "done" in lines["frequency_core"] and "shared with the distilled core" in lines["frequency_core"]
    assert "3 trainings" in lines["reuse[none_compute,k=8,seed=0]"]
    assert lines["evaluate[none_compute,k=8,seed=0]"].split()[1] == "done"  # the column holds for long labels
    assert main(["check", str(reuse_config_yaml)]) == 0
    out = capsys.readouterr().out
    planned = {line.split()[1]: line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    for label in ("frequency_core", "reuse[frequency,k=8,seed=0]", "reuse[none_compute,k=8,seed=0]"):
        assert planned[label] == "cached", label


def test_a_repeated_consistency_seed_is_planned_once(make_config, tmp_path):
    """consistency_seeds [0, 0] at seed 1: the seed-0 arms once, every label of the plan distinct."""
    from flows.pipeline import plan

    cfg = make_config(tmp_path / "s", "reuse.k=[4, 8]", "reuse.consistency_seeds=[0, 0]", "seed=1")
    labels = [n.label for n in plan(cfg).nodes]
    assert len(labels) == len(set(labels))
    assert "reuse[distilled,k=8,seed=0]" in labels and "reuse[distilled,k=8,seed=1]" in labels
