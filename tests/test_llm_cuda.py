"""Fine-tuning and decoding on a CUDA GPU (bf16 weights, fp32 LoRA): skipped without one.

The CPU tests pin the behaviour; this file checks the device paths (dtype "auto" = bf16 on
CUDA, tensors created on the right device, masks and caches on the GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from automr.data.schema import PreparedData
from automr.methods.registry import make_method
from automr.stages.finetune import FinetuneConfig, run_finetune
from automr.llm.loading import build_tiny_lm, save_lm
from automr.methods.bigrec import GenerativeOptions, GenerativeRecommender
from automr.llm.toy import make_toy_prepared, memorised_tiny_lm, toy_titles

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_finetune_resume_and_bigrec_on_cuda(tmp_path: Path) -> None:
    data = make_toy_prepared(tmp_path / "data")
    save_lm(build_tiny_lm(toy_titles(20)), tmp_path / "base")
    kw = dict(samples=data, model=str(tmp_path / "base"), progress=False, max_train_samples=32,
              max_valid_samples=8, batch_size=8, grad_accum=1, epochs=3, eval_every=2, lr=1e-2, warmup_steps=0,
              memory_aware_prob=0.5, patience=100)
    run_finetune(FinetuneConfig(out=tmp_path / "a", **kw))
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    valid = [r["valid_loss"] for r in log if "valid_loss" in r]
    assert valid[-1] < valid[0] - 0.3, valid
    run_finetune(FinetuneConfig(out=tmp_path / "b", stop_after=5, **kw))
    run_finetune(FinetuneConfig(out=tmp_path / "b", **kw))
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-2, atol=1e-3)

    prepared = PreparedData.load(data)
    test = prepared.split("test")
    for decoding in ("grounding", "constrained"):
        rec = make_method("bigrec", {"adapter": str(tmp_path / "a"), "decoding": decoding, "progress": False})
        rec.fit(prepared, tmp_path / decoding)
        assert rec.lm.device.type == "cuda" and rec.lm.dtype == torch.bfloat16
        recs = rec.recommend(test, k=5)
        assert recs.shape == (test.height, 5) and np.isin(recs[recs >= 0], np.arange(1, 21)).all()


def test_memorised_model_on_cuda(tmp_path: Path) -> None:
    root = make_toy_prepared(tmp_path / "data")
    lm = memorised_tiny_lm(root, steps=60, device="cuda")
    data = PreparedData.load(root)
    test = data.split("test")
    for decoding in ("grounding", "constrained"):
        rec = GenerativeRecommender(GenerativeOptions(decoding=decoding, progress=False), lm=lm)
        rec.fit(data, tmp_path / decoding)
        recs = rec.recommend(test, k=5)
        assert (recs[:, 0] == test["target_item"].to_numpy()).all()
