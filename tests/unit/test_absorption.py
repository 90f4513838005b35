"""Feature absorption (dmsae.eval.absorption) on a hand-built world where the answer is known.

Residuals: a word of letter L is 2 e_L plus small noise in dims 30..38 plus 20 e_39, shared by all
(letters a..e, orthogonal directions). A hand-set SAE (ReLU(x W_enc + b), unit decoder rows) has:
- a: one main latent; a third of the a-words also carry a token direction u_w (3 u_w, dims 5..28) that the
  main latent's encoder subtracts, so it stays silent on them while a token latent fires whose decoder row
  is (e_a + u_w)/sqrt 2: it carries the a direction. That is absorption, planted on known words.
- b: split in two latents, one per half of the b-words (told apart by +-1 on dim 29), both decoding to e_b.
- c, d: one clean latent each. e: no latent at all (the SAE does not represent it).
- distractors firing on the noise dims, orthogonal to every letter, and one firing on e_39 whose decoder
  has a small cosine with e_a: large, but too weakly aligned to count as absorbing.
Nothing is mocked: the probe, the k-sparse search and the absorption rules all run.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from dmsae.eval.absorption import (
    AbsorptionResult,
    absorption,
    first_letter_words,
    prompt_for,
    token_index,
    train_letter_probe,
)

D, N_LETTERS, PER_LETTER = 40, 5, 60
TOKEN_DIMS, SPLIT_DIM, NOISE_DIMS, OFFSET_DIM = 5, 29, slice(30, 39), 39
# latent ids in world(): 0 a, 1 b (first half), 2 c, 3 d, 4 b (second half), then token latents, distractors
MAIN = {"a": [0], "b": [1, 4], "c": [2], "d": [3]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The problems here are tiny: threads only add overhead (and contention on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def world(absorb: bool = True, partial: bool = False, seed: int = 0):
    """(x, letters, encode, w_dec, absorbed rows, partly absorbed rows)."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.arange(N_LETTERS).repeat_interleave(PER_LETTER)
    n = len(letters)
    x = torch.zeros(n, D)
    x[torch.arange(n), letters] = 2.0
    x[:, NOISE_DIMS] = 0.3 * torch.randn(n, 9, generator=g)
    x[:, OFFSET_DIM] = 20.0  # a large direction shared by every word, as residual streams have
    b_rows = (letters == 1).nonzero().flatten()
    x[b_rows, SPLIT_DIM] = torch.where(torch.arange(len(b_rows)) % 2 == 0, 1.0, -1.0)
    a_rows = (letters == 0).nonzero().flatten()
    absorbed = a_rows[::3][:20] if absorb else a_rows[:0]
    partly = a_rows[1::3][:4] if partial else a_rows[:0]  # token latent fires, main latent stays on
    special = torch.cat([absorbed, partly])
    x[special, TOKEN_DIMS + torch.arange(len(special))] = 3.0

    enc, dec, bias = [], [], []

    def latent(e: torch.Tensor, b: float, w: torch.Tensor) -> None:
        enc.append(e)
        bias.append(b)
        dec.append(w / w.norm())

    eye = torch.eye(D)
    a_enc = eye[0].clone()
    a_enc[TOKEN_DIMS:TOKEN_DIMS + len(absorbed)] = -1.0  # silenced by the absorbed words' own directions
    latent(a_enc, -1.0, eye[0])
    latent(eye[1] + 2 * eye[SPLIT_DIM], -2.0, eye[1])
    latent(eye[2], -1.0, eye[2])
    latent(eye[3], -1.0, eye[3])
    latent(eye[1] - 2 * eye[SPLIT_DIM], -2.0, eye[1])
    for j in range(len(special)):  # token-specific latents, decoders containing the a direction
        latent(eye[TOKEN_DIMS + j], -1.0, eye[0] + eye[TOKEN_DIMS + j])
    for k in range(NOISE_DIMS.start, NOISE_DIMS.stop):
        latent(eye[k], 0.0, eye[k])
    # fires hard on every word; its decoder leans slightly towards e_a (cosine < 0.1): never an absorber
    latent(eye[OFFSET_DIM], 0.0, eye[OFFSET_DIM] + 0.08 * eye[0])
    w_enc, b, w_dec = torch.stack(enc, 1), torch.tensor(bias), torch.stack(dec)

    def encode(v: torch.Tensor) -> torch.Tensor:
        return torch.relu(v @ w_enc + b)

    return x, letters, encode, w_dec, absorbed, partly


def run(absorb: bool = True, partial: bool = False, **kw) -> tuple[AbsorptionResult, torch.Tensor, ...]:
    """(result, the probe's held-out rows, absorbed rows, partly absorbed rows)."""
    x, letters, encode, w_dec, absorbed, partly = world(absorb, partial)
    probe = train_letter_probe(x, letters, test_fraction=0.5, seed=1)
    return absorption(x, letters, probe, encode, w_dec, **kw), probe.test_idx, absorbed, partly


def letter_row(res: AbsorptionResult, letter: str) -> pd.Series:
    return res.letters.set_index("letter").loc[letter]


@pytest.fixture(scope="module")
def absorbing() -> tuple[AbsorptionResult, torch.Tensor, ...]:
    return run(partial=True)


def test_absorbed_words_are_found_and_clean_letters_score_zero(absorbing):
    res, test_idx, absorbed, partly = absorbing
    assert res.reason is None
    for letter, main in MAIN.items():  # token latents are never main latents; b's split is found
        assert sorted(letter_row(res, letter).main_latents) == main
    f1_b = letter_row(res, "b").f1_by_k  # one half of the b-words, then all of them
    assert abs(f1_b[0] - 2 / 3) < 0.1 and f1_b[1] == 1
    a = letter_row(res, "a")
    assert len(a.f1_by_k) == 2  # k = 2 adds a token latent, which never fires on held-out words: no jump
    held_out = sorted(set(absorbed.tolist()) & set(test_idx.tolist()))
    n_a_test = int(a.n_test_words)
    assert a.evaluated and a.n_probe_tp == n_a_test  # the probe finds every held-out a-word
    words = res.words[res.words.letter == "a"]
    # exactly the planted words, and nothing else, are fully absorbed
    assert sorted(words[words.full_absorption].row.tolist()) == held_out
    assert a.absorption_rate == pytest.approx(len(held_out) / n_a_test)
    assert abs(a.absorption_rate - 1 / 3) < 0.1
    assert a.n_main_miss == len(held_out)
    # fully absorbed words count 1 each; the rest 0, except the partly absorbed ones (next test)
    fractions = words.set_index("row").absorption_fraction
    assert (fractions[held_out] == 1).all()
    assert (fractions.drop(held_out + partly.tolist(), errors="ignore") == 0).all()
    for letter in "bcd":
        row = letter_row(res, letter)
        assert row.evaluated and row.absorption_rate == 0 and row.absorption_fraction == 0
    e = letter_row(res, "e")  # the probe knows e, the SAE has no latent for it
    assert e.probe_f1 == 1 and not e.evaluated and "no latent" in e.skip_reason
    assert res.means["n_letters"] == 4
    assert res.means["absorption_rate"] == pytest.approx(a.absorption_rate / 4)
    assert res.means["absorption_fraction"] == pytest.approx(a.absorption_fraction / 4)
    assert res.means["n_main"] == 1.25


def test_partial_absorption_gives_a_fraction_but_not_full_absorption(absorbing):
    res, test_idx, _, partly = absorbing
    held_out = sorted(set(partly.tolist()) & set(test_idx.tolist()))
    assert held_out, "the seed must put some partly absorbed words in the test split"
    words = res.words.set_index("row")
    for r in held_out:
        w = words.loc[r]
        # the main latent carries about half of P; the token latent more than the rest, so the absorbed
        # share is capped at P - M: fraction (P - M) / P, near 1/2
        assert w.main_fired and not w.full_absorption
        assert w.absorber_projection > w.probe_projection - w.main_projection
        assert w.absorption_fraction == pytest.approx(1 - w.main_projection / w.probe_projection)
        assert 0.4 < w.absorption_fraction < 0.6
    a = letter_row(res, "a")
    assert a.absorption_fraction > a.absorption_rate


def test_no_absorption_scores_zero():
    res, *_ = run(absorb=False)
    assert res.reason is None and res.means["n_letters"] == 4
    done = res.letters[res.letters.evaluated]
    assert (done.absorption_rate == 0).all() and (done.absorption_fraction == 0).all()
    assert res.means["absorption_rate"] == 0 and res.means["absorption_fraction"] == 0
    assert sorted(letter_row(res, "a").main_latents) == [0]


def test_probe_separates_letters_on_held_out_words():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    letters = torch.arange(26).repeat_interleave(16)
    x = 6 * q[letters] + torch.randn(len(letters), 40, generator=g) + 5  # an offset the probe must absorb
    probe = train_letter_probe(x, letters, seed=0)
    assert len(probe.test_idx) > 60 and not set(probe.test_idx.tolist()) & set(probe.train_idx.tolist())
    assert probe.accuracy > 0.95
    assert float(probe.f1.min()) > 0.8
    shuffled = letters[torch.randperm(len(letters), generator=g)]
    assert train_letter_probe(x, shuffled, seed=0).accuracy < 0.3  # no signal, no accuracy


def test_deterministic(absorbing):
    again, *_ = run(partial=True)
    pd.testing.assert_frame_equal(absorbing[0].letters, again.letters, check_exact=True)
    pd.testing.assert_frame_equal(absorbing[0].words, again.words, check_exact=True)
    assert absorbing[0].means == again.means
    x, letters, *_ = world()
    p, q = train_letter_probe(x, letters, seed=5), train_letter_probe(x, letters, seed=5)
    assert torch.equal(p.weight, q.weight) and torch.equal(p.bias, q.bias) and torch.equal(p.test_idx, q.test_idx)
    assert not torch.equal(p.test_idx, train_letter_probe(x, letters, seed=6).test_idx)


def test_degenerate_inputs_give_a_reason_not_an_exception():
    x, letters, encode, w_dec, *_ = world()
    only_a = letters == 0
    probe = train_letter_probe(x[only_a], letters[only_a])
    res = absorption(x[only_a], letters[only_a], probe, encode, w_dec)
    assert res.reason and math.isnan(res.means["absorption_rate"]) and res.letters.empty

    probe = train_letter_probe(x, letters)
    silent = absorption(x, letters, probe, lambda v: torch.zeros(len(v), len(w_dec)), w_dec)
    assert silent.reason and math.isnan(silent.means["absorption_fraction"])

    # every letter below the word-count gate: a table that says why, and no means
    gated = absorption(x, letters, probe, encode, w_dec, min_words=PER_LETTER + 1)
    assert gated.reason and (~gated.letters.evaluated).all()
    assert gated.letters.skip_reason.str.contains("fewer than").all()

    with pytest.raises(ValueError):
        absorption(x[:10], letters[:10], probe, encode, w_dec)  # not the rows the probe was trained on


def test_word_filter_handles_space_markers():
    vocab = {"Ġcat": 5, "cat": 3, "▁dog": 7, "Ġa": 8, "Ġ": 9, "<s>": 0, "ĠCat": 10, "ing": 11,
             "Ġcafé": 12, "Ġ123": 13, "ĠApple": 14, "Ċ": 15, "▁▁": 16, "zebra": 17}
    words = first_letter_words(vocab)
    assert [(w.token_id, w.word, w.letter, w.text) for w in words] == [
        (5, "cat", "c", " cat"), (7, "dog", "d", " dog"), (11, "ing", "i", "ing"), (17, "zebra", "z", "zebra")]
    assert {w.word for w in first_letter_words(vocab, lowercase_only=False)} >= {"Cat", "Apple"}
    as_list = first_letter_words(["<pad>", "▁the", "the", "▁of"])  # tokens listed by id
    assert [(w.token_id, w.text) for w in as_list] == [(3, " of"), (1, " the")]
    many = {f"Ġw{chr(97 + i)}{chr(97 + j)}": 26 * i + j for i in range(26) for j in range(26)}
    some = first_letter_words(many, max_words=50, seed=1)
    assert len(some) == 50 and some == first_letter_words(many, max_words=50, seed=1)
    assert [w.word for w in some] == sorted(w.word for w in some)
    assert some != first_letter_words(many, max_words=50, seed=2)


def test_prompt_and_token_position():
    examples = [" apple", " bird", " cat", " dog", " egg"]
    p = prompt_for(" cat", examples, n_examples=3, seed=0)
    assert p.text.startswith("\n") and p.text.endswith("\n cat has the first letter:")
    assert p.text[p.word_start:p.word_end] == " cat" and p.answer == " C"
    lines = p.text.strip("\n").split("\n")
    assert len(lines) == 4 and all(line.endswith(f": {line.split()[0][0].upper()}") for line in lines[:3])
    assert not any(line.startswith(" cat") for line in lines[:3])  # the query word is never an example
    assert p == prompt_for(" cat", examples, n_examples=3, seed=0)
    # a word-level split of the prompt's tail: " cat" is the token ending at word_end
    tail = [" cat", " has", " the", " first", " letter", ":"]
    start = p.word_start
    offsets = [(0, start)]
    for tok in tail:
        offsets.append((start, start + len(tok)))
        start += len(tok)
    assert token_index(offsets, p.word_end) == 1 == len(offsets) - 6
    with pytest.raises(ValueError):
        token_index([(0, 3)], 10)
