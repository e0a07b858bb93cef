"""`automr tiny-lm`: a tiny model trained on prepared samples, lower layers left at their random init."""

from __future__ import annotations

from pathlib import Path

import torch

from memory_helpers import make_tiny_prepared, single_thread


def test_upper_layers_train_lower_layers_stay_random(tmp_path: Path) -> None:
    from automr.data.schema import PreparedData
    from automr.llm.loading import build_tiny_lm, load_lm
    from automr.stages.tiny_lm import TinyLMConfig, run_tiny_lm

    gen = single_thread()
    next(gen)
    try:
        data = make_tiny_prepared(tmp_path / "data")
        out = run_tiny_lm(TinyLMConfig(samples=data, out=tmp_path / "model", epochs=2, hidden_size=32, num_layers=4, progress=False))
        titles = PreparedData.load(data).titles()
        ref = build_tiny_lm([titles[i] for i in sorted(titles)], hidden_size=32, num_layers=4).model.state_dict()
        lm = load_lm(str(out), device="cpu")
        got = lm.model.state_dict()
        for name, w in ref.items():
            same = torch.equal(w, got[name])
            lower = "embed_tokens" in name or ".layers.0." in name or ".layers.1." in name
            if lower:
                assert same, f"{name} changed but layers below L = 2 and the embeddings are frozen"
            elif name.endswith("q_proj.weight"):
                assert not same, f"{name} did not train"
        assert lm.name.startswith("tiny-llama-") and "-trained-" in lm.name  # caches keyed by name see new weights
        assert (out / "summary.json").is_file() and (out / "train_log.jsonl").read_text().count("\n") == 2
    finally:
        gen.close()
