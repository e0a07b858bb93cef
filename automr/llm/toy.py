"""A tiny prepared data set whose next item is a fixed function of the last one.

Tests and benchmarks of fine-tuning and decoding need data on which a tiny model can learn
something in seconds: every user walks the catalogue in order (item i is followed by item
i + 1 mod N), so the target is determined by the last recent title. The folder follows the
prepared-data contract (automr.data.schema), so every stage can read it.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from automr.data.schema import ITEM_SCHEMA, SAMPLE_SCHEMA

_ADJ = ["Silent", "Golden", "Broken", "Hidden", "Crimson", "Frozen", "Electric", "Lonely", "Wild", "Ancient"]
_NOUN = ["River", "Forest", "Crown", "Garden", "Machine", "Harbor", "Empire", "Letter", "Mirror", "Voyage"]


def toy_titles(n_items: int = 20) -> list[str]:
    """n distinct short titles such as 'Silent River' or 'Golden Forest: Part 3'."""
    titles = []
    for i in range(n_items):
        a, b = _ADJ[i % len(_ADJ)], _NOUN[(i * 3 + i // len(_ADJ)) % len(_NOUN)]
        titles.append(f"{a} {b}" if i < len(_ADJ) else f"{a} {b}: Part {i // len(_ADJ) + 1}")
    assert len(set(titles)) == n_items, "toy titles must be unique"
    return titles


def next_item(item: int, n_items: int) -> int:
    """The toy rule: item i is followed by item i + 1 (mod n). Item ids start at 1."""
    return (item % n_items) + 1


def make_toy_prepared(
    root: str | Path,
    n_items: int = 20,
    n_users: int = 12,
    seq_len: int = 18,
    recent_k: int = 4,
) -> Path:
    """Write a prepared data folder under `root`; returns it.

    User u starts at item (u mod n) + 1 and walks forward; the last two interactions are the
    valid and test targets, the earlier ones (after `recent_k` warm-up) training targets.
    """
    root = Path(root)
    (root / "samples").mkdir(parents=True, exist_ok=True)
    titles = toy_titles(n_items)
    items = pl.DataFrame({"item_id": list(range(1, n_items + 1)), "title": titles}, schema=ITEM_SCHEMA)
    items.write_parquet(root / "items.parquet")
    rows: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        seq = [(u % n_items) + 1]
        while len(seq) < seq_len:
            seq.append(next_item(seq[-1], n_items))
        times = [1_000_000 + 1000 * u + 10 * t for t in range(seq_len)]
        for t in range(recent_k, seq_len):
            split = "test" if t == seq_len - 1 else "valid" if t == seq_len - 2 else "train"
            rows[split].append(
                {
                    "user_id": u,
                    "target_item": seq[t],
                    "target_time": times[t],
                    "recent_items": seq[t - recent_k : t],
                    "recent_times": times[t - recent_k : t],
                    "memory_items": seq[: t - recent_k],
                    "memory_times": times[: t - recent_k],
                }
            )
    for split, r in rows.items():
        pl.DataFrame(r, schema=SAMPLE_SCHEMA).write_parquet(root / "samples" / f"{split}.parquet")
    return root


def memorised_tiny_lm(root: str | Path, steps: int = 40, lr: float = 3e-3, seed: int = 1, device: str = "cpu"):
    """A tiny random Llama trained (all weights, no LoRA) on the distinct training prompts of a
    toy folder until it names the next item: a model whose right answers are known, for tests
    and benchmarks of decoding. Returns an `LM` in eval mode.
    """
    import torch

    from automr.data.schema import PreparedData
    from automr.llm.finetune import answer_nll, collate, encode_samples, sequence
    from automr.llm.loading import build_tiny_lm
    from automr.llm.prompts import PromptBuilder

    data = PreparedData.load(root)
    titles = data.titles()
    lm = build_tiny_lm([titles[i] for i in sorted(titles)], seed=seed)
    lm.model.to(device)
    builder = PromptBuilder.for_lm(lm)
    samples = encode_samples(data.split("train"), titles, builder)
    distinct = list({tuple(s.prefix_ids + s.answer_ids): s for s in samples}.values())
    batch = collate([sequence(s, []) for s in distinct], lm.tokenizer.pad_token_id, lm.device)
    opt = torch.optim.Adam(lm.model.parameters(), lr=lr)
    lm.model.train()
    for _ in range(steps):
        nll, n = answer_nll(lm.model, batch)
        (nll / n).backward()
        opt.step()
        opt.zero_grad()
    lm.model.eval()
    return lm
