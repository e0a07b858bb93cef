"""TRSR-style summaries: the LLM condenses the older history into text that fills the memory slot.

TRSR (Zheng et al. 2024, "Harnessing Large Language Models for Text-Rich Sequential
Recommendation") summarises a long behaviour sequence block by block, each step updating the
running summary with the next block. Here the sequence is the sample's memory (older
interactions, oldest first) in blocks of `block_size` (5):

    summary_0 = ""
    summary_i = LLM("Previous summary: {summary_{i-1}}
                     New items: t_1; ...; t_5.
                     Update the summary of the user's preferences in one sentence:")
    slot text = summary_B,  B = ceil(|M| / block_size)          ("" when the memory is empty)

Greedy decoding with `max_new_tokens` (48), on the BASE LLM (no adapter, plain `generate`). The
prompt goes through the tokenizer's chat template when it has one (SmolLM2-Instruct does), and the
answer is started with `answer_prefix` ("The user likes"): without it SmolLM2-135M mostly echoed
the prompt ("The new summary: The new summary: ...") on movielens-100k blocks.

Cache. summary_i is a deterministic function of the item ids of blocks 1..i (given the model,
catalogue and prompt), so it is cached under a chained key

    key_0 = H(fingerprint)      fingerprint = model name, catalogue hash, block size, max_new_tokens, prompt
    key_i = H(key_{i-1}, ids of block i)

in SQLite under the work_dir (WAL; safe for several processes of a sharded run; committed per
batch, so an interrupted run resumes). While a user's history is shorter than the cap, a later
sample's memory extends the earlier one, so its first blocks are cache hits and only the new
blocks cost LLM calls; identical prefixes of different users share entries too. Once the
history reaches the cap, the memory window slides and block boundaries move, so each such
sample needs a fresh chain (a property of TRSR on capped windows, not of this cache).

Batching: all pending blocks of one depth across the batch's samples are generated together
(left padding), depth by depth, since block i needs summary_{i-1}.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import polars as pl
from pydantic import Field

from automr.args import DeviceArgs, LogArgs, ModelNameArgs
from automr.utils.fingerprint import catalogue_hash
from automr.data.schema import PreparedData
from automr.errors import UserError
from automr.methods.bigrec import GenerativeOptions, GenerativeRecommender
from automr.utils.logging import info

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.loading import LM
    from automr.llm.split import Slot

PROMPT_VERSION = 1  # bump when the prompt wording changes: old cache entries then stop matching
CACHE_FILE = "trsr-summaries.sqlite"
PromptStyle = Literal["update", "taste"]


class TrsrOptions(ModelNameArgs, DeviceArgs, LogArgs):
    """Options of the TRSR summarizer: its LLM (`model`) and how it writes the summaries."""

    block_size: int = Field(5, ge=1, description="memory items added to the summary per LLM call")
    max_new_tokens: int = Field(48, ge=1, description="length limit of each summary (greedy decoding)")
    batch_size: int = Field(16, ge=1, description="prompts generated together")
    chat_template: bool = Field(True, description="wrap the prompt in the tokenizer's chat template when it has one")
    prompt_style: PromptStyle = Field(
        "update", description="'update': 'Previous summary / New items / Update the summary...' (design); "
        "'taste': new items first, asks for genres or themes"
    )
    answer_prefix: str = Field(
        "The user likes",
        description="text the answer is started with (part of the summary); '' to let the model start. Small "
        "models otherwise tend to echo the prompt ('The new summary: The new summary: ...')",
    )


def summary_prompt(previous: str, titles: Sequence[str], style: PromptStyle = "update") -> str:
    """The instruction for one block (plain text, before any chat template).

    "update" is the wording of the design; "taste" asks for genres or themes and puts the new
    items first, which SmolLM2-135M followed better (fewer echoes of the instruction).
    """
    prev = previous.strip() or "(none yet)"
    if style == "taste":
        return (
            f"A user recently enjoyed: {'; '.join(titles)}.\n"
            f"Earlier description of the user's taste: {prev}\n"
            "In one sentence, describe the user's taste, mentioning genres or themes."
        )
    return (
        f"Previous summary: {prev}\n"
        f"New items: {'; '.join(titles)}.\n"
        "Update the summary of the user's preferences in one sentence:"
    )


def clean_summary(text: str) -> str:
    """First non-empty line of the generation, whitespace collapsed: a summary is one sentence."""
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line
    return ""


def _h(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode())
        h.update(b"\x1f")
    return h.hexdigest()


class SummaryCache:
    """key -> summary in SQLite, plus an in-process dict in front of it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=60)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS summaries (key TEXT PRIMARY KEY, summary TEXT NOT NULL, n_items INTEGER NOT NULL)"
        )
        self.conn.commit()
        self.mem: dict[str, str] = {}

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The cached entries among `keys` (memory first, then disk)."""
        found: dict[str, str] = {}
        missing = []
        for k in keys:
            if k in self.mem:
                found[k] = self.mem[k]
            else:
                missing.append(k)
        for lo in range(0, len(missing), 500):
            chunk = missing[lo : lo + 500]
            rows = self.conn.execute(
                f"SELECT key, summary FROM summaries WHERE key IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            for k, s in rows:
                found[k] = s
                self.mem[k] = s
        return found

    def put_many(self, rows: Sequence[tuple[str, str, int]]) -> None:
        """Store (key, summary, n_items) rows and commit, so finished work survives an interruption."""
        self.conn.executemany("INSERT OR REPLACE INTO summaries (key, summary, n_items) VALUES (?, ?, ?)", rows)
        self.conn.commit()
        for k, s, _ in rows:
            self.mem[k] = s

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM summaries").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class TrsrSummarizer:
    """Recurrent block summaries of each sample's memory, cached on disk."""

    name = "trsr"

    def __init__(self, options: TrsrOptions | None = None, lm: "LM | None" = None) -> None:
        self.options = options or TrsrOptions()
        self.lm = lm
        self.titles: dict[int, str] | None = None
        self.cache: SummaryCache | None = None
        self._root_key = ""
        # counters since construction: blocks needed, blocks served by the cache, LLM calls
        self.stats = {"samples": 0, "blocks": 0, "cache_hits": 0, "generated": 0, "seconds": 0.0}

    # -- setup -------------------------------------------------------------------------------
    def fit(self, data: PreparedData, work_dir: Path) -> None:
        """Load the base LLM (unless one was given), the titles and the on-disk cache."""
        if self.lm is None:
            from automr.llm.loading import load_lm

            self.lm = load_lm(self.options.model, dtype=self.options.dtype, device=self.options.device)
        self.titles = data.titles()
        if self.cache is not None:
            self.cache.close()
        self.cache = SummaryCache(Path(work_dir) / CACHE_FILE)
        o = self.options
        fingerprint = json.dumps(
            {
                "model": self.lm.name,
                "catalogue": catalogue_hash(data.items),
                "block_size": o.block_size,
                "max_new_tokens": o.max_new_tokens,
                "chat_template": o.chat_template and self._has_chat_template(),
                "answer_prefix": o.answer_prefix,
                "prompt": [PROMPT_VERSION, summary_prompt("{prev}", ["{t1}", "{t2}"], o.prompt_style)],
            },
            sort_keys=True,
        )
        self._root_key = _h(fingerprint)

    def _has_chat_template(self) -> bool:
        return bool(getattr(self.lm.tokenizer, "chat_template", None))

    # -- keys --------------------------------------------------------------------------------
    def chain_keys(self, memory: Sequence[int]) -> list[str]:
        """Cache keys of summary_1..summary_B for one memory list (oldest first)."""
        b = self.options.block_size
        keys, key = [], self._root_key
        for lo in range(0, len(memory), b):
            key = _h(key, ",".join(str(int(i)) for i in memory[lo : lo + b]))
            keys.append(key)
        return keys

    # -- main entry --------------------------------------------------------------------------
    def summaries(self, samples: pl.DataFrame, *, quiet: bool = False) -> list[str]:
        """Per sample (row order kept), the summary of its memory; "" when the memory is empty.

        quiet: no throughput line (for calls expected to be all cache hits; a bar still shows if
        anything has to be generated).
        """
        if self.cache is None or self.titles is None or self.lm is None:
            raise RuntimeError("TrsrSummarizer.summaries called before fit")
        from automr.utils.progress import rate_progress

        start = time.perf_counter()
        b = self.options.block_size
        memories = [list(m or []) for m in samples["memory_items"].to_list()]
        unknown = sorted({i for m in memories for i in m if i not in self.titles})
        if unknown:
            raise UserError(
                f"samples mention item ids missing from the catalogue (items.parquet), e.g. {unknown[:10]}; "
                "re-run `automr prepare` so samples and items come from the same run"
            )
        chains = [self.chain_keys(m) for m in memories]
        # node key -> (parent key or "", block's item ids, depth)
        nodes: dict[str, tuple[str, list[int], int]] = {}
        for m, keys in zip(memories, chains):
            parent = ""
            for d, k in enumerate(keys):
                nodes.setdefault(k, (parent, m[d * b : (d + 1) * b], d))
                parent = k
        known = self.cache.get_many(nodes)
        # Only the blocks after a chain's deepest cached summary need the LLM.
        todo: dict[str, int] = {}  # key -> depth
        for keys in chains:
            for k in reversed(keys):
                if k in known:
                    break
                todo[k] = nodes[k][2]
        n_gen = len(todo)
        if n_gen:
            if not quiet:  # the bar shows nothing in a log file until it ends: say what is running
                info(f"trsr: generating {n_gen} summaries of {len(nodes)} memory blocks ({len(nodes) - n_gen} cached) ...")
            with rate_progress("summaries", transient=True, disable=not self.options.progress) as progress:
                task = progress.add_task("trsr: summarising memory blocks", total=n_gen)
                # depth by depth: block i's prompt needs summary_{i-1}
                for depth in sorted(set(todo.values())):
                    level = [k for k, d in todo.items() if d == depth]
                    for lo in range(0, len(level), self.options.batch_size):
                        batch = level[lo : lo + self.options.batch_size]
                        prompts = [
                            summary_prompt(known[nodes[k][0]] if nodes[k][0] else "",
                                           [self.titles[i] for i in nodes[k][1]], self.options.prompt_style)
                            for k in batch
                        ]
                        texts = self._generate(prompts)
                        self.cache.put_many([(k, t, nodes[k][2] * b + len(nodes[k][1])) for k, t in zip(batch, texts)])
                        known.update(zip(batch, texts))
                        progress.advance(task, len(batch))
        elapsed = time.perf_counter() - start
        n_blocks = len(nodes)
        self.stats["samples"] += len(memories)
        self.stats["blocks"] += n_blocks
        self.stats["cache_hits"] += n_blocks - n_gen
        self.stats["generated"] += n_gen
        self.stats["seconds"] += elapsed
        hit = (n_blocks - n_gen) / n_blocks if n_blocks else 1.0
        if not quiet:
            info(
                f"trsr: {len(memories)} samples, {n_blocks} memory blocks, {n_gen} summaries generated in {elapsed:.1f} s "
                f"({n_gen / max(elapsed, 1e-9):.2f} summaries/s), cache hit rate {hit:.1%}"
            )
        return [known[keys[-1]] if keys else "" for keys in chains]

    # -- LLM ---------------------------------------------------------------------------------
    def _encode(self, prompt: str) -> list[int]:
        tok = self.lm.tokenizer
        prefix = self.options.answer_prefix
        if self.options.chat_template and self._has_chat_template():
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            return tok(text + prefix, add_special_tokens=False)["input_ids"]
        return tok(f"{prompt} {prefix}" if prefix else prompt)["input_ids"]

    def _generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuations of a batch of prompts (left-padded by hand, so the shared
        tokenizer's padding side is never changed)."""
        import torch
        from transformers import GenerationConfig

        tok = self.lm.tokenizer
        model = self.lm.model
        ids = [self._encode(p) for p in prompts]
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[r, width - len(x) :] = 1
        config = GenerationConfig(
            max_new_tokens=self.options.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
            )  # (B, T + new)
        new = out[:, width:].cpu()
        prefix = self.options.answer_prefix
        return [clean_summary(prefix + tok.decode(row, skip_special_tokens=True)) for row in new]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None


def expected_llm_calls(memory_len: int, block_size: int = 5) -> int:
    """LLM calls a fresh (uncached) memory of this length needs: ceil(|M| / block_size)."""
    return math.ceil(memory_len / block_size)


# -- the `trsr` method: BIGRec with the summary text in the slot -------------------------------
class TrsrMethodOptions(GenerativeOptions):
    """Options of METHODS['trsr']: the generative recommender's plus the summarizer's (prefixed summary_)."""

    summary_model: str | None = Field(
        None, description="LLM that writes summaries (default: the recommender's base model, without adapter)"
    )
    summary_block_size: int = Field(5, ge=1, description=TrsrOptions.model_fields["block_size"].description)
    summary_max_new_tokens: int = Field(48, ge=1, description=TrsrOptions.model_fields["max_new_tokens"].description)
    summary_batch_size: int = Field(16, ge=1, description=TrsrOptions.model_fields["batch_size"].description)
    summary_chat_template: bool = Field(True, description=TrsrOptions.model_fields["chat_template"].description)
    summary_prompt_style: PromptStyle = Field("update", description=TrsrOptions.model_fields["prompt_style"].description)
    summary_answer_prefix: str = Field("The user likes", description=TrsrOptions.model_fields["answer_prefix"].description)


class TrsrRecommender(GenerativeRecommender):
    """BIGRec whose slot holds the TRSR summary of the sample's memory, as text."""

    name = "trsr"

    def __init__(self, options: TrsrMethodOptions, seed: int = 0, *, lm: "LM | None" = None,
                 base_lm: "LM | None" = None, summary_lm: "LM | None" = None) -> None:
        super().__init__(options, seed, lm=lm, base_lm=base_lm)
        self.summary_lm = summary_lm
        self.summarizer: TrsrSummarizer | None = None
        self._extras: dict[str, list[Any]] = {}

    def _base_for_summaries(self) -> "LM":
        """The base LLM: TRSR summarises with the pre-trained model, not the fine-tuned recommender."""
        from automr.llm.loading import load_lm

        o: TrsrMethodOptions = self.options  # type: ignore[assignment]
        if self.summary_lm is not None:
            return self.summary_lm
        if o.summary_model is not None:
            self.summary_lm = load_lm(o.summary_model, device=o.device, dtype=o.dtype)
        elif o.adapter is None:
            assert self.lm is not None
            self.summary_lm = self.lm  # zero-shot: the recommender already is the base model
        else:
            if self.base_lm is None:
                from automr.llm.finetune import adapter_base

                model_name, cache_dir = adapter_base(o.adapter)
                self.base_lm = load_lm(model_name, device=o.device, dtype=o.dtype, cache_dir=cache_dir)
            self.summary_lm = self.base_lm
        return self.summary_lm

    def fit_slots(self, data: PreparedData, work_dir: Path) -> None:
        o: TrsrMethodOptions = self.options  # type: ignore[assignment]
        lm = self._base_for_summaries()
        self.summarizer = TrsrSummarizer(
            TrsrOptions(
                model=lm.name, block_size=o.summary_block_size, max_new_tokens=o.summary_max_new_tokens,
                batch_size=o.summary_batch_size, chat_template=o.summary_chat_template, prompt_style=o.summary_prompt_style,
                answer_prefix=o.summary_answer_prefix, dtype=o.dtype, device=o.device, progress=o.progress,
            ),
            lm=lm,
        )
        self.summarizer.fit(data, Path(work_dir))

    def recommend(self, samples: pl.DataFrame, k: int) -> Any:
        if self.summarizer is not None:
            # all summaries up front: one bar, one throughput line; slot_for then hits the cache
            self._extras = {"summary": self.summarizer.summaries(samples)}
        return super().recommend(samples, k)

    def last_extras(self) -> dict[str, list[Any]]:
        """{"summary": [...]}: the slot text of each sample of the last call ("" = empty slot)."""
        return self._extras

    def slot_for(self, samples: pl.DataFrame) -> list["Slot"]:
        assert self.summarizer is not None and self.builder is not None
        texts = self.summarizer.summaries(samples, quiet=True)  # cache hits after recommend()'s warm-up
        return [self.builder.slot_text_ids(t) if t else None for t in texts]


def make(options: dict[str, Any], seed: int) -> TrsrRecommender:
    """Factory behind METHODS['trsr'] (greedy summaries: `seed` only reaches the recommender)."""
    from automr.config import build_config

    return TrsrRecommender(build_config(TrsrMethodOptions, options, source="trsr options"), seed)
