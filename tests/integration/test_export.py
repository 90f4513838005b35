"""SAELens export (dmsae.export, `dmsae export`): the JumpReLU formula of SAELens, written out here, on
RAW layer-L residuals reproduces dmsae's own encoding of the scaled residuals, and decoding agrees."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

LAYER = 1
BOS_ID = 1
LABEL = "reuse[distilled,k=8,seed=0]"  # an SAE with a core and a non-core part


def saelens_encode(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens JumpReLU with apply_b_dec_to_input."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    return torch.relu(pre) * (pre > w["threshold"]).to(pre.dtype)


def saelens_decode(w: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    return f @ w["W_dec"] + w["b_dec"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(single_thread):
    with single_thread():  # forward passes: far faster than two threads on a busy 2-core machine
        yield


@pytest.fixture(scope="module")
def raw_residuals(reuse_run) -> torch.Tensor:
    """Unscaled layer-L residuals of the eval split at non-BOS positions, from our own forward pass."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(reuse_run.artifact("model").path)).eval()
    ids = load_file(str(reuse_run.artifact("tokens").file("tokens.safetensors")))["eval"].long()
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
    return h[ids != BOS_ID].float()


@pytest.fixture(scope="module")
def exported(reuse_run, tmp_path_factory):
    from dmsae.export import export_saelens

    out = tmp_path_factory.mktemp("saelens") / "sae"
    art = reuse_run.load(LABEL)
    result = export_saelens(art, out, model_name="tiny-llama", layer=LAYER, context=32, dataset="corpus.jsonl",
                            label=LABEL)
    assert result == out
    return out


def test_export_writes_a_jumprelu_config(exported, reuse_run):
    cfg = json.loads((exported / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert (cfg["d_in"], cfg["d_sae"]) == (64, 128)
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"  # the scale is folded into the weights
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["context_size"] == 32
    assert meta["dmsae"]["key"] == reuse_run.node(LABEL).key
    assert meta["dmsae"]["core_size"] == reuse_run.artifact("select", 1).metrics["core_size"]
    assert meta["dmsae"]["activation_scale_folded"] == reuse_run.artifact("harvest").metrics["scale"]


def test_export_weights_have_saelens_names_and_shapes(exported):
    w = load_file(str(exported / "sae_weights.safetensors"))
    assert {n: tuple(t.shape) for n, t in w.items()} == {
        "W_enc": (64, 128), "b_enc": (128,), "W_dec": (128, 64), "b_dec": (64,), "threshold": (128,)}
    assert all(t.dtype == torch.float32 for t in w.values())
    assert all(torch.isfinite(t).all() for t in w.values())


def dmsae_codes(reuse_run, x_raw: torch.Tensor, dtype: torch.dtype):
    from dmsae import readers

    sae, scale = readers.load_sae(reuse_run.load(LABEL))
    sae = sae.to(dtype)
    with torch.no_grad():
        f_core, f_nc = sae.encode(x_raw.to(dtype) * scale)
        x_hat = sae.decode(f_core, f_nc)
    return sae, scale, torch.cat([f_core, f_nc], dim=1), x_hat


def test_saelens_encoding_of_raw_activations_reproduces_dmsae(exported, reuse_run, raw_residuals):
    w64 = {n: t.double() for n, t in load_file(str(exported / "sae_weights.safetensors")).items()}
    sae, scale, f_ref, x_hat_ref = dmsae_codes(reuse_run, raw_residuals, torch.float64)
    assert abs(scale - 1.0) > 0.05  # so a forgotten scale would show
    f = saelens_encode(w64, raw_residuals.double())
    assert f.shape == f_ref.shape == (raw_residuals.shape[0], 128)
    assert torch.equal(f > 0, f_ref > 0)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)  # the folded weights are float32 products
    c = sae.core_size
    assert 0 < c and (f[:, :c] > 0).any() and (f[:, c:] > 0).any()  # both parts are exercised
    # decoding: SAELens' raw-space reconstruction is dmsae's scaled one divided by the scale
    torch.testing.assert_close(saelens_decode(w64, f), x_hat_ref / scale, rtol=1e-5, atol=1e-5)


def test_saelens_encoding_in_float32(exported, reuse_run, raw_residuals):
    """In float32 the folded and unfolded products round differently: the codes agree to rounding,
    and a latent may only flip on or off where it sits at its threshold."""
    w = load_file(str(exported / "sae_weights.safetensors"))
    _, scale, f_ref, x_hat_ref = dmsae_codes(reuse_run, raw_residuals, torch.float32)
    f = saelens_encode(w, raw_residuals)
    differ = (f > 0) != (f_ref > 0)
    assert int(differ.sum()) <= 2, int(differ.sum())
    both = ~differ
    torch.testing.assert_close(f[both], f_ref[both], rtol=1e-4, atol=1e-4)
    if not differ.any():
        torch.testing.assert_close(saelens_decode(w, f), x_hat_ref / scale, rtol=1e-4, atol=1e-4)


def test_export_without_folding_the_scale_would_not_match(reuse_run, raw_residuals):
    """Guard for the test above: the raw weights on raw activations give other codes."""
    w = {n: t.double() for n, t in load_file(str(reuse_run.load(LABEL).file("sae.safetensors"))).items()}
    _, _, f_ref, _ = dmsae_codes(reuse_run, raw_residuals, torch.float64)
    assert not torch.allclose(saelens_encode(w, raw_residuals.double()), f_ref, atol=1e-3)


# -- command line ------------------------------------------------------------------------------------


def test_cli_export_default_sae(reuse_config_yaml, reuse_run, tmp_path):
    from flows.cli import main

    out = tmp_path / "default"
    assert main(["export", str(reuse_config_yaml), "--out", str(out)]) == 0
    assert (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file()
    cfg = json.loads((out / "cfg.json").read_text())
    # sae.k=6 is not among reuse.k=[4, 8]: the default is the last cycle's SAE
    assert cfg["metadata"]["dmsae"]["sae"] == "train[1]"
    assert cfg["metadata"]["dmsae"]["key"] == reuse_run.node("train[1]").key


def test_cli_export_a_chosen_sae(reuse_config_yaml, reuse_run, tmp_path, raw_residuals):
    from flows.cli import main

    out = tmp_path / "chosen"
    assert main(["export", str(reuse_config_yaml), "--sae", LABEL, "--out", str(out)]) == 0
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["dmsae"]["key"] == reuse_run.node(LABEL).key
    w = {n: t.double() for n, t in load_file(str(out / "sae_weights.safetensors")).items()}
    _, _, f_ref, _ = dmsae_codes(reuse_run, raw_residuals, torch.float64)
    torch.testing.assert_close(saelens_encode(w, raw_residuals.double()), f_ref, rtol=1e-5, atol=1e-5)


def test_cli_export_unknown_sae_is_a_user_error(reuse_config_yaml, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "none"
    assert main(["export", str(reuse_config_yaml), "--sae", "nonexistent", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err and "train[0]" in err
    assert not out.exists()
