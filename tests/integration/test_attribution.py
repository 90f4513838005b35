"""stages.attribute: A[t, j] = f_j(t) * dL/df_j(t) on the tiny model, against an independent float64
autograd computation (own hook, own SAE maths from the saved tensors, own loss mask) and central
finite differences.

The loss is the summed next-token cross-entropy over predictions whose source position and target
are both real tokens (docs/design.md: "BOS and padding excluded"; stages.attribute.loss_mask: "1 where both
the position and its next-token target are real tokens").
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dmsae import lm, readers
from stages import attribute as attribute_stage

LAYER = 1
BOS_ID = 1  # the tiny tokenizer's <s> (checked against the tokens artifact in the fixture)


class Reference:
    """The spliced loss as a function of the candidate codes f, computed from scratch in float64."""

    def __init__(self, model, sae_file: str, ids: torch.Tensor):
        self.model, self.ids = model, ids
        with safe_open(sae_file, "pt") as f:
            meta = json.loads(f.metadata()["dmsae"])
        t = {k: v.double() for k, v in load_file(sae_file).items()}
        self.scale = float(meta["scale"])
        c = int(meta["core_size"])
        width = t["W_enc"].shape[1]
        m0 = max(1, round(0.125 * (width - c)))  # first Matryoshka group of the tiny config
        self.n_inner = c + m0
        self.spliced = ids != BOS_ID
        h = self.layer_output()
        x = h[self.spliced] * self.scale
        pre = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
        # every inner latent, core included, fires above its stored threshold (0 for a relu core)
        inner = pre[:, : c + m0]
        self.f = torch.where(inner > t["threshold"][: c + m0], inner, torch.zeros_like(inner))
        self.w_inner = t["W_dec"][: self.n_inner]
        self.b_dec = t["b_dec"]
        self.core_size = c

    def layer_output(self) -> torch.Tensor:
        got = []

        def hook(_m, _i, out):
            got.append(out if isinstance(out, torch.Tensor) else out[0])

        handle = self.model.model.layers[LAYER].register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.model(input_ids=self.ids, use_cache=False)
        finally:
            handle.remove()
        return got[0]

    def target_mask(self) -> torch.Tensor:
        """[B, T-1]: prediction t -> t+1 counts iff ids[t] and ids[t+1] are both real tokens."""
        return (self.ids[:, :-1] != BOS_ID) & (self.ids[:, 1:] != BOS_ID)

    def loss(self, f: torch.Tensor) -> torch.Tensor:
        x_hat0 = self.b_dec + f @ self.w_inner

        def hook(_m, _i, out):
            h = out if isinstance(out, torch.Tensor) else out[0]
            new = h.clone()
            new[self.spliced] = x_hat0 / self.scale
            return new if isinstance(out, torch.Tensor) else (new, *out[1:])

        handle = self.model.model.layers[LAYER].register_forward_hook(hook)
        try:
            logits = self.model(input_ids=self.ids, use_cache=False).logits
        finally:
            handle.remove()
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -logp.gather(-1, self.ids[:, 1:, None]).squeeze(-1)
        return (nll * self.target_mask()).sum()

    def attribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.f.clone().requires_grad_(True)
        total = self.loss(f)
        (grad,) = torch.autograd.grad(total, f)
        return (self.f * grad).detach(), total.detach()


@pytest.fixture(scope="module")
def setup(pipeline_run, bos_id):
    from transformers import LlamaForCausalLM

    assert bos_id == BOS_ID == pipeline_run.artifact("tokens").metrics["bos_id"]
    model = LlamaForCausalLM.from_pretrained(str(pipeline_run.artifact("model").path)).double().eval()
    model.requires_grad_(False)
    train_art = pipeline_run.artifact("train", 1)  # an SAE with a transferred core
    sae, scale = readers.load_sae(train_art)
    sae.double()
    windows = load_file(str(pipeline_run.artifact("tokens").file("tokens.safetensors")))["attribution"]
    ids = windows[:4].long()
    assert ((ids[:, 1:] == BOS_ID).any(dim=1)).any(), "want document boundaries inside a window"
    ref = Reference(model, str(train_art.file(readers.SAE_FILE)), ids)
    assert sae.core_size == ref.core_size > 0
    assert scale == ref.scale
    out = attribute_stage.attribution_batch(model, sae, LAYER, scale, ids, BOS_ID)
    a_ref, loss_ref = ref.attribution()
    return {"model": model, "sae": sae, "ids": ids, "ref": ref, "out": out, "a_ref": a_ref, "loss_ref": loss_ref}


def test_reference_is_not_trivial(setup):
    f, a = setup["ref"].f, setup["a_ref"]
    c = setup["ref"].core_size
    assert (f[:, :c] > 0).any() and (f[:, c:] > 0).any()  # core and non-core candidates fire
    assert (a[:, :c] != 0).any() and (a[:, c:] != 0).any()


def test_candidates_and_positions(setup):
    out, ref = setup["out"], setup["ref"]
    assert out["abs_attr"].shape == (int(ref.spliced.sum()), ref.n_inner)
    torch.testing.assert_close(out["f_core"].double(), ref.f[:, : ref.core_size], rtol=1e-5, atol=1e-6)


def test_loss_excludes_exactly_the_bos_predictions(setup):
    out, ref = setup["out"], setup["ref"]
    assert float(out["loss_count"]) == float(ref.target_mask().sum())
    assert float(out["loss_sum"]) == pytest.approx(float(setup["loss_ref"]), rel=1e-5)


def test_loss_mask_with_token_losses_counts_real_to_real_predictions():
    """Hand-made window: BOS a b BOS c d e. Counted predictions: a->b, c->d, d->e (never from or to BOS)."""
    ids = torch.tensor([[BOS_ID, 5, 6, BOS_ID, 7, 8, 9]])
    logits = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(0))
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = torch.zeros_like(nll)
    for t in (1, 4, 5):
        expected[0, t] = nll[0, t]
    mask = lm.loss_mask(ids, BOS_ID)
    got = lm.token_losses(logits, ids, mask)
    torch.testing.assert_close(got, expected)
    assert float(mask.sum()) == 3


def test_attribution_equals_gradient_times_activation(setup):
    got = setup["out"]["abs_attr"].double()
    want = setup["a_ref"].abs()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.max()))


def test_attribution_matches_finite_differences(setup):
    ref, got, a_ref = setup["ref"], setup["out"]["abs_attr"].double(), setup["a_ref"]
    # active codes with an attribution well above the float32 noise of the finite differences
    active = ((ref.f > 0) & (a_ref.abs() > 0.02 * a_ref.abs().max())).nonzero().tolist()
    assert len(active) >= 6
    strongest = a_ref.abs().flatten().argsort(descending=True)[:3].tolist()
    picks = [divmod(i, ref.n_inner) for i in strongest]
    gen = torch.Generator().manual_seed(0)
    picks += [tuple(active[int(i)]) for i in torch.randperm(len(active), generator=gen)[:3]]
    # LlamaRMSNorm computes in float32 even in a float64 model, so the loss carries ~1e-7 relative noise:
    # a step of 1e-2 on codes of order 1 keeps both that noise and the O(eps^2) truncation near 1e-5.
    eps = 1e-2
    with torch.no_grad():
        for t, j in picks:
            assert ref.f[t, j] > 0
            plus, minus = ref.f.clone(), ref.f.clone()
            plus[t, j] += eps
            minus[t, j] -= eps
            fd = (ref.loss(plus) - ref.loss(minus)) / (2 * eps) * ref.f[t, j]
            # the reference itself; 5e-3: the float32 noise above, seen up to 1.7e-3 on small attributions
            assert float(a_ref[t, j]) == pytest.approx(float(fd), rel=5e-3, abs=1e-6)
            assert float(got[t, j]) == pytest.approx(abs(float(fd)), rel=5e-3, abs=1e-6), (t, j)


def test_stored_scores_are_mean_absolute_attribution(pipeline_run):
    """The attribute[0] artifact: s_j = mean over spliced attribution tokens of |A[t, j]|."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(pipeline_run.artifact("model").path)).double().eval()
    model.requires_grad_(False)
    train_art = pipeline_run.artifact("train", 0)
    windows = load_file(str(pipeline_run.artifact("tokens").file("tokens.safetensors")))["attribution"].long()
    total, n_tok = None, 0
    for i in range(0, windows.shape[0], 4):
        ref = Reference(model, str(train_art.file(readers.SAE_FILE)), windows[i:i + 4])
        a, _ = ref.attribution()
        total = a.abs().sum(0) if total is None else total + a.abs().sum(0)
        n_tok += a.shape[0]
    expected = total / n_tok
    scores = load_file(str(pipeline_run.artifact("attribute", 0).file(readers.SCORES_FILE)))["scores"].double()
    assert pipeline_run.artifact("attribute", 0).metrics["n_tokens"] == n_tok
    torch.testing.assert_close(scores, expected, rtol=2e-3, atol=1e-4 * float(expected.max()))
