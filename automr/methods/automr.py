"""Memory-augmented inference: every retrieval method as BIGRec plus one memory element in the slot.

AutoMR, random retrieval, most-recent retrieval and ReLLa-style retrieval differ only in *which*
element of a sample's memory goes into the prompt's memory slot; `MemoryRecommender` takes the
choice from a selector (automr.methods.selectors protocol) and fills the slot:

  slot="states" (default)  the chosen element's VALUE from the memory store, spliced at layer L:
                           the layer-L states of its title tokens, or its key vector, whichever
                           the store holds (StoreMeta.value_kind; build-memory `value_kind`).
  slot="text"              the chosen element's title written in the slot as text tokens (ablation).

AutoMR's selector (`RetrieverSelector`) is the trained retriever scoring the sample's memory keys
z_m with its query z_t (stored by build-memory in queries/{split}.npy; computed with the same
prompt when a sample is not there).

Where the memory comes from. `memory` names a build-memory output (its layer and model must be
the recommender's). Without it, the elements the evaluated samples need are built on the fly with
the build-memory code (same windows, same states), per user, into a store cached in the method's
work folder, so a second evaluation reuses it.

Which element was used is exposed per sample through `last_extras()` (retrieved_item,
retrieved_time, retrieved_index into memory_items; None where the slot stayed empty; with top_k > 1 also the lists retrieved_items / retrieved_times), which the evaluator saves as prediction columns
and the report plots (when retrieved memories happened relative to the target).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl
from pydantic import AliasChoices, Field

from automr.config import build_config
from automr.data.schema import SPLITS, PreparedData
from automr.errors import UserError
from automr.llm.prompts import DEFAULT_SLOT_TOKENS
from automr.methods.bigrec import GenerativeOptions, GenerativeRecommender
from automr.methods.selectors import (
    MemorySelector,
    MostRecentSelector,
    OracleSelector,
    RandomSelector,
)
from automr.utils.logging import info

if TYPE_CHECKING:  # pragma: no cover
    from automr.llm.loading import LM
    from automr.llm.split import Slot
    from automr.memory.retriever import Retriever
    from automr.memory.store import MemoryStore

ROW = "_memory_row"  # hidden column: a sample's position in the current recommend() call
Choice = list[int]  # indices into a sample's memory_items, best first ([] = empty slot)


class MemoryMethodOptions(GenerativeOptions):
    """Options shared by the retrieval methods (automr, random, recent, rella): BIGRec's plus the memory's."""

    memory: Path | None = Field(
        None,
        description="build-memory output folder (the memory store); absent: the elements the evaluated samples need "
        "are built on the fly with the build-memory code and cached in the method's work folder",
    )
    slot: Literal["states", "text"] = Field(
        "states",
        description="what fills the slot: 'states' = the chosen element's value from the store (layer-L title states "
        "or key vector, per the store), spliced at layer L; 'text' = its title as text tokens (ablation)",
    )
    value_kind: Literal["title_states", "key_vector"] = Field(
        "title_states", description="on-the-fly memory only (no `memory`): value kind of the elements built"
    )
    value_tokens: int = Field(DEFAULT_SLOT_TOKENS, ge=1, description="on-the-fly memory only: title tokens kept per value")
    build_batch_size: int = Field(16, ge=1, description="on-the-fly memory only: prompts per forward pass")
    allow_model_mismatch: bool = Field(
        False, description="use a store built with another model name (not advised: states of one model mean nothing to another)"
    )


class AutomrOptions(MemoryMethodOptions):
    """Options of the `automr` method: the retrieval methods' plus the trained retriever."""

    retriever: Path = Field(description="train-retriever output folder (retriever.safetensors + retriever.json)")
    queries: Path | None = Field(
        None,
        description="folder with stored query states {split}.npy (default: MEMORY/queries when present); samples "
        "not found there get z_t computed from their prompt",
    )
    slot_elements: int | None = Field(
        None, ge=1, le=3, validation_alias=AliasChoices("slot_elements", "top_k"),
        description="elements put in the slot per sample, 1-3 (default: the retriever's top_k, 1 = argmax, the paper's; "
        "`top_k` is accepted as the old name): the top-k retrieved elements' values side by side in time order, "
        "oldest first; every prompt then reserves k values' tokens (see MemoryRecommender.slot_budget)",
    )


# ---------------------------------------------------------------------------------------------
# AutoMR's chooser
# ---------------------------------------------------------------------------------------------
class RetrieverSelector:
    """The trained retriever as a selector: argmax (or top-k) of MLP(z_t)^T z_m over the sample's memory keys."""

    name = "automr"

    def __init__(self, retriever: "Path | Retriever", queries: Path | None = None, top_k: int | None = None) -> None:
        # A folder (a train-retriever output), or a Retriever in memory (see make_automr).
        in_memory = not isinstance(retriever, Path | str)
        self.folder = Path("<in memory>") if in_memory else Path(retriever)
        self.retriever: Retriever | None = retriever if in_memory else None
        self.queries_folder = queries
        self.top_k = top_k
        self.rec: MemoryRecommender | None = None
        self.timings: dict[str, float] = {}
        # (queries, key sets, available positions, features or None) of the last select_many
        self.last_inputs: tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray] | None] | None = None

    def fit(self, data: PreparedData, work_dir: Path) -> None:
        from automr.methods.feature_retriever import load_retriever

        if self.retriever is None:
            self.retriever = load_retriever(self.folder)  # either kind: the paper's or the feature retriever
        self.top_k = self.slot_elements()

    def slot_elements(self) -> int:
        """Elements per slot: the option, else the retriever's top_k (read from its folder before fit, torch-free)."""
        if self.top_k is not None:
            return int(self.top_k)
        if self.retriever is not None:
            return int(self.retriever.config.top_k)
        from automr.memory.retriever_config import retriever_top_k

        return retriever_top_k(self.folder)

    def bind(self, rec: "MemoryRecommender") -> None:
        """Called by the recommender once its store and model are ready."""
        assert self.retriever is not None and rec.store is not None
        if self.retriever.hidden_size != rec.store.hidden_size:
            raise UserError(
                f"the retriever {self.folder} was trained on states of size {self.retriever.hidden_size} but the memory "
                f"store {rec.store.folder} holds size {rec.store.hidden_size}; use the retriever trained on this store's model and layer."
            )
        self.rec = rec
        rec.load_query_index(self.queries_folder)

    def select_many(self, samples: pl.DataFrame) -> list[Choice]:
        """Per sample, up to top_k indices into memory_items, best first (only elements present in the store)."""
        assert self.rec is not None and self.retriever is not None and self.rec.store is not None, "fit() first"
        store = self.rec.store
        t0 = time.perf_counter()
        rows = self.rec.memory_rows(samples)
        avail = [np.flatnonzero(r >= 0) for r in rows]
        key_sets = [store.keys(r[a]) for r, a in zip(rows, avail)]
        t1 = time.perf_counter()
        z = self.rec.query_states(samples)  # (n, H)
        t2 = time.perf_counter()
        from automr.methods.feature_retriever import element_features

        feats = element_features(self.retriever, samples, avail)  # None for the paper's retriever
        picked = self.retriever.select_batch(z, key_sets, self.top_k or 1, feats)  # (n, k) into key_sets, -1 padding
        # Seconds of the last call by step: reading the keys, the query z_t (lower layers, unless stored), scoring.
        self.timings = {"keys_s": t1 - t0, "query_s": t2 - t1, "score_s": time.perf_counter() - t2}
        self.last_inputs = (z, key_sets, avail, feats)  # the server explains a choice by its scores (`scores_of_last`)
        return [[int(a[j]) for j in p if j >= 0] for a, p in zip(avail, picked)]

    def scores_of_last(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i of the last `select_many`: (indices into its memory_items that the store held, the
        retriever's softmax scores S over them), for the "why" of a served recommendation."""
        assert self.retriever is not None and self.last_inputs is not None
        z, key_sets, avail, feats = self.last_inputs
        if not len(avail[i]):
            return avail[i], np.zeros(0, np.float32)
        return avail[i], self.retriever.scores(z[i], key_sets[i], None if feats is None else feats[i])

    def select(self, samples: pl.DataFrame) -> list[int | None]:
        return [c[0] if c else None for c in self.select_many(samples)]


# ---------------------------------------------------------------------------------------------
# The recommender
# ---------------------------------------------------------------------------------------------
class MemoryRecommender(GenerativeRecommender):
    """BIGRec with the memory element chosen by `selector` in the slot (states or text)."""

    def __init__(
        self,
        options: MemoryMethodOptions,
        selector: MemorySelector,
        seed: int = 0,
        *,
        lm: "LM | None" = None,
        base_lm: "LM | None" = None,
    ) -> None:
        super().__init__(options, seed, lm=lm, base_lm=base_lm)
        self.selector = selector
        self.name = selector.name
        self.store: MemoryStore | None = None
        self.data: PreparedData | None = None
        self._choices: list[Choice] | None = None  # of the current recommend() call, by ROW
        self._extras: dict[str, list[Any]] = {}
        self._built_users: set[int] = set()
        self._on_the_fly: dict[str, Any] | None = None
        self._query_index: pl.DataFrame | None = None
        self._queries: dict[str, np.ndarray] = {}
        self.query_counts = {"stored": 0, "computed": 0}
        self.memory_builds = 0  # on-the-fly builds run by this instance (0 when the cache had every user)
        self.last_choices: list[Choice] = []  # of the last recommend() call, per sample (the server's "why")

    @property
    def mopts(self) -> MemoryMethodOptions:
        return self.options  # type: ignore[return-value]

    def slot_budget(self) -> int:
        """The slot reserve of every prompt (PromptBuilder's rule): k times the store's value length for k
        elements per slot (`slot_tokens` overrides it).

        With k = 1 that is what annotation and build-memory reserved, so every prompt keeps their titles.
        With k > 1 the reserve covers k values, so every prompt of this method (slot filled or not) keeps
        the same titles; where max_length cuts, that can be fewer titles than the stored query z_t and
        keys z_m saw (they were built with one value's reserve). The retriever still scores those stored
        states; only the decoding prompt is shorter. Below max_length nothing changes.
        """
        o = self.mopts
        if o.slot_tokens is not None:
            return o.slot_tokens
        k = int(getattr(self.selector, "slot_elements", lambda: 1)())
        if o.memory is None:
            return k * o.value_tokens  # the on-the-fly store's
        from automr.memory.store import MemoryStore

        with MemoryStore.open(o.memory) as store:  # fit() needs the reserve before fit_slots opens the store
            return k * int(store.meta.max_value_tokens)

    def _needs_store(self) -> bool:
        return self.mopts.slot == "states" or isinstance(self.selector, RetrieverSelector)

    # -- setup ----------------------------------------------------------------------------
    def fit_slots(self, data: PreparedData, work_dir: Path) -> None:
        """Open (or prepare to build) the memory store, match the split layer to it, fit the selector."""
        from automr.llm.split import SplitLM

        o = self.mopts
        work_dir = Path(work_dir)
        self.data = data
        assert self.lm is not None and self.split is not None
        if self._needs_store():
            if o.memory is not None:
                from automr.memory.store import MemoryStore

                self.store = MemoryStore.open(o.memory)
                self._check_store()
                layer = self.store.meta.layer
                if layer is not None and layer != self.split.split_layer:
                    self.split = SplitLM(self.lm, int(layer))
            else:
                self._open_on_the_fly(data, work_dir)
        self.selector.fit(data, work_dir / "selector")
        bind = getattr(self.selector, "bind", None)
        if bind is not None:
            bind(self)

    def _check_store(self) -> None:
        assert self.store is not None and self.lm is not None
        o, meta = self.mopts, self.store.meta
        problems = []
        if meta.model_name != self.lm.name and not o.allow_model_mismatch:
            problems.append(
                f"it was built with model {meta.model_name!r} but this method loads {self.lm.name!r} (use the same "
                "model/adapter as build-memory, or pass allow_model_mismatch: true)"
            )
        if o.split_layer is not None and meta.layer is not None and o.split_layer != meta.layer:
            problems.append(f"it holds layer-{meta.layer} states but split_layer is {o.split_layer} (drop split_layer to follow the store)")
        if meta.hidden_size != self.lm.hidden_size:
            problems.append(f"its states have size {meta.hidden_size}, the model's hidden size is {self.lm.hidden_size}")
        if problems:
            raise UserError(f"memory store {self.store.folder} does not fit {self.name}: " + "; ".join(problems))

    def _open_on_the_fly(self, data: PreparedData, work_dir: Path) -> None:
        """A store in the work folder, keyed by everything its states depend on; users are added as needed."""
        from automr.memory.build import infer_window
        from automr.memory.store import MemoryStore
        from automr.utils.fingerprint import catalogue_hash

        assert self.lm is not None and self.split is not None and self.builder is not None
        o = self.mopts
        frames = {s: data.split(s) for s in SPLITS}
        window = infer_window(frames)
        key = {
            "model": self.lm.name, "layer": self.split.split_layer, "value_kind": o.value_kind,
            "value_tokens": o.value_tokens, "window": window, "max_length": o.max_length, "slot_tokens": self.builder.slot_tokens,
            "data": str(Path(data.root).resolve()), "catalogue": catalogue_hash(data.items),
            "samples": {s: frames[s].height for s in SPLITS},
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        folder = work_dir / f"memory-{digest}"
        done_file = folder / "built_users.json"
        store: MemoryStore | None = None
        built: set[int] = set()
        if folder.exists():
            built = set(json.loads(done_file.read_text())) if done_file.is_file() else set()
            try:
                store = MemoryStore.open(folder, "r")
            except UserError:  # no meta.json: a create that did not finish
                store = None
            if store is None or set(store.users().tolist()) - built:  # an interrupted build: start over
                if store is not None:
                    store.close()
                shutil.rmtree(folder)
                store, built = None, set()
        if store is None:
            MemoryStore.create(
                folder, self.split.hidden_size, o.value_tokens, layer=self.split.split_layer, model_name=self.lm.name,
                mode="exact", value_kind=o.value_kind, extra=key | {"on_the_fly": True}, durable=False,
            ).close()
            done_file.write_text("[]")
            store = MemoryStore.open(folder, "r")
        self.store = store
        self._built_users = built
        self._on_the_fly = {"window": window, "done_file": done_file}

    def ensure_memory(self, samples: pl.DataFrame) -> None:
        """On-the-fly mode: build every element of the samples' users not yet in the store (no-op otherwise).

        A user is built from all of their samples in every split (build-memory's merged history), so
        the elements and their positions are the same whichever samples are evaluated first.
        """
        if self._on_the_fly is None or self.store is None:
            return
        users = sorted(set(samples["user_id"].to_list()) - self._built_users)
        if not users:
            return
        from automr.memory.build import (
            _Encoder,
            append_elements,
            compute_jobs,
            place_samples,
            plan_jobs,
        )
        from automr.memory.store import MemoryStore

        assert self.data is not None and self.builder is not None and self.split is not None
        o = self.mopts
        frames = {
            s: self.data.split(s).with_row_index("row").filter(pl.col("user_id").is_in(users)) for s in SPLITS
        }
        histories, placements, _ = place_samples(frames)
        encoder = _Encoder(self.builder)  # the inference prompts' builder: the same titles kept (one rule)
        window = self._on_the_fly["window"]
        jobs, counts = plan_jobs(
            users, histories, placements, self.data.titles(), encoder,
            window=window, mode="exact", chunk_items=window, queries=False,
        )
        store = MemoryStore.open(self.store.folder, "a", durable=False)  # the one writer, only while building

        def on_batch(els: list, qs: list) -> None:
            append_elements(store, histories, els)

        try:
            timing = compute_jobs(
                self.split, jobs, batch_size=o.build_batch_size, value_tokens=o.value_tokens, value_kind=o.value_kind,
                on_batch=on_batch, progress=o.progress, description=f"{self.name}: memory on the fly",
            )
        finally:
            store.close()
        self.store.refresh()
        self.memory_builds += 1
        self._built_users |= set(users)
        self._on_the_fly["done_file"].write_text(json.dumps(sorted(self._built_users)))
        secs = max(timing["seconds"], 1e-9)
        info(f"{self.name}: built {counts['elements']} memory elements of {len(users)} users on the fly in {secs:.1f} s "
             f"({counts['elements'] / secs:.1f} elements/s, {timing['tokens'] / secs:,.0f} tokens/s) -> {self.store.folder}")

    # -- memory rows and queries --------------------------------------------------------------
    def memory_rows(self, samples: pl.DataFrame) -> list[np.ndarray]:
        """Per sample, store rows [|M|] aligned with memory_items (-1 where the store lacks the element)."""
        assert self.store is not None
        out = []
        for u, items, times in zip(samples["user_id"].to_list(), samples["memory_items"].to_list(),
                                   samples["memory_times"].to_list()):
            items, times = items or [], times or []
            out.append(self.store.rows_for(int(u), items, times, missing="mark") if items else np.zeros(0, np.int64))
        return out

    def load_query_index(self, folder: Path | None) -> None:
        """Index the stored query states z_t (queries/{split}.npy, row-aligned with the split's samples)."""
        if folder is None and self.mopts.memory is not None and (Path(self.mopts.memory) / "queries").is_dir():
            folder = Path(self.mopts.memory) / "queries"
        if folder is None or self.data is None:
            return
        folder = Path(folder)
        if (folder / "queries").is_dir():
            folder = folder / "queries"
        if not folder.is_dir():
            raise UserError(f"queries folder {folder} does not exist; point `queries` at a build-memory output's queries/ folder")
        frames = []
        for s in SPLITS:
            f = folder / f"{s}.npy"
            if not f.is_file():
                continue
            q = np.load(f, mmap_mode="r")
            df = self.data.split(s)
            if q.shape[0] != df.height:
                raise UserError(
                    f"{f} holds {q.shape[0]} query states but {self.data.root}/samples/{s}.parquet has {df.height} samples; "
                    "build-memory read other prepared data. Rebuild the memory from this folder or drop `queries`."
                )
            self._queries[s] = q
            frames.append(df.select("user_id", "target_time", "target_item").with_row_index("q_row")
                          .with_columns(pl.lit(s).alias("q_split")))
        if frames:
            idx = pl.concat(frames).cast({"q_row": pl.Int64})
            self._query_index = idx.unique(["user_id", "target_time", "target_item"], keep="none")

    def query_states(self, samples: pl.DataFrame) -> np.ndarray:
        """z_t per sample, float32 (n, H): the stored state where the sample is indexed, else computed."""
        assert self.split is not None and self.builder is not None
        n = samples.height
        H = self.split.hidden_size
        z = np.full((n, H), np.nan, np.float32)
        if self._query_index is not None and n:
            hit = (samples.select("user_id", "target_time", "target_item").with_row_index("i")
                   .join(self._query_index, on=["user_id", "target_time", "target_item"], how="inner"))
            for i, s, r in zip(hit["i"].to_list(), hit["q_split"].to_list(), hit["q_row"].to_list()):
                z[i] = self._queries[s][r]
        todo = np.flatnonzero(np.isnan(z).any(axis=1))
        self.query_counts["stored"] += n - len(todo)
        self.query_counts["computed"] += len(todo)
        if len(todo):
            recents = samples["recent_items"].to_list()
            prompts = [self.builder.encode([self.titles[i] for i in recents[j]]).prefix_ids for j in todo.tolist()]
            bs = max(1, self.options.batch_size)
            for s in range(0, len(prompts), bs):
                st = self.split.last_token_states(prompts[s : s + bs]).float().cpu().numpy()
                z[todo[s : s + bs]] = st
        return z

    # -- choosing and filling the slot --------------------------------------------------------
    def choose(self, samples: pl.DataFrame) -> list[Choice]:
        """Per sample, indices into memory_items to put in the slot, best first."""
        many = getattr(self.selector, "select_many", None)
        if many is not None:
            return many(samples)
        return [[] if i is None else [int(i)] for i in self.selector.select(samples)]

    def recommend(self, samples: pl.DataFrame, k: int) -> np.ndarray:
        """Choose every sample's element first (one batched selector call), then decode as BIGRec."""
        if self.split is None:
            raise RuntimeError("call fit() before recommend()")
        t0 = time.perf_counter()
        self.ensure_memory(samples)
        choices = self.choose(samples)
        self._choices = self.last_choices = choices
        retrieve_s = time.perf_counter() - t0
        items, times, index, all_items, all_times = [], [], [], [], []
        for c, mi, mt in zip(choices, samples["memory_items"].to_list(), samples["memory_times"].to_list()):
            items.append(int(mi[c[0]]) if c else None)
            times.append(int(mt[c[0]]) if c else None)
            index.append(int(c[0]) if c else None)  # position in memory_items (oldest first): how many interactions ago
            all_items.append([int(mi[j]) for j in c])
            all_times.append([int(mt[j]) for j in c])
        self._extras = {"retrieved_item": items, "retrieved_time": times, "retrieved_index": index}
        if any(len(c) > 1 for c in choices):  # top_k > 1: every element in the slot, best first
            self._extras |= {"retrieved_items": all_items, "retrieved_times": all_times}
        n_full = sum(1 for c in choices if c)
        info(f"{self.name}: chose memory for {n_full}/{samples.height} samples in {time.perf_counter() - t0:.2f} s")
        try:
            out = super().recommend(samples.with_columns(pl.int_range(0, samples.height, dtype=pl.Int64).alias(ROW)), k)
            self.timings = {"retrieve_s": retrieve_s, **dict(getattr(self.selector, "timings", {})), **self.timings}
            return out
        finally:
            self._choices = None

    @contextmanager
    def serving_store(self, store: "MemoryStore") -> Iterator[None]:
        """Recommend from `store` instead of the method's own (the server's memory of its users, a
        scratch store for a history no store holds): same model, layer and value kind, checked.
        Elements it lacks are skipped (-1 rows), never built from the prepared data."""
        assert self.store is not None, "fit() first (and a method whose slot reads the store)"
        problems = self.store.meta.compatibility_problems(store.meta)
        problems = [p for p in problems if not p.startswith("mode")]  # exact and chunked elements mix
        if problems:
            raise UserError(f"memory store {store.folder} does not fit {self.name}'s store {self.store.folder}: " + "; ".join(problems))
        saved = self.store, self._on_the_fly
        self.store, self._on_the_fly = store, None
        try:
            yield
        finally:
            self.store, self._on_the_fly = saved

    def last_extras(self) -> dict[str, list[Any]]:
        """Per-sample columns of the last recommend() call: the (first) retrieved element's item and time,
        and with top_k > 1 the lists of all elements put in the slot (retrieved_items / retrieved_times)."""
        return dict(self._extras)

    def slot_for(self, samples: pl.DataFrame) -> list["Slot"]:
        if self._choices is not None and ROW in samples.columns:
            choices = [self._choices[int(r)] for r in samples[ROW].to_list()]
        else:  # called directly (tests, serving): choose for this batch
            self.ensure_memory(samples)
            choices = self.choose(samples)
        return self.slots_from_choices(samples, choices)

    def slots_from_choices(self, samples: pl.DataFrame, choices: list[Choice]) -> list["Slot"]:
        """Slot contents for chosen memory indices: the values (states) or the titles (text), oldest first.

        Time order, not retrieval order: the recent titles are listed oldest to newest, so the slot reads
        as more of the same history; and the slot of a set of elements does not depend on the scores'
        order among them (k = 1 is unaffected either way)."""
        import torch

        assert self.builder is not None
        mem_items = samples["memory_items"].to_list()
        if self.mopts.slot == "text":
            out: list[Slot] = []
            for c, mi in zip(choices, mem_items):
                ids: list[int] = []
                for j in sorted(c):
                    ids += self.builder.slot_text_ids(self.titles[int(mi[j])])
                out.append(ids or None)
            return out
        assert self.store is not None
        rows = self.memory_rows(samples)
        out = []
        for b, (c, r) in enumerate(zip(choices, rows)):
            if not c:
                out.append(None)
                continue
            chosen = r[sorted(c)]
            if (chosen < 0).any():
                raise UserError(
                    f"the memory store {self.store.folder} has no element for user {samples['user_id'][b]}, item "
                    f"{mem_items[b][sorted(c)[int(np.argmax(chosen < 0))]]}: it was built from other samples (or max_users). "
                    "Rebuild it from this prepared data (all splits), or drop `memory` to build elements on the fly."
                )
            vals = [np.asarray(v, np.float32) for v in self.store.values(chosen)]
            out.append(torch.from_numpy(np.concatenate(vals, axis=0)))  # (S, H)
        return out


# ---------------------------------------------------------------------------------------------
# Factories behind METHODS
# ---------------------------------------------------------------------------------------------
def make_automr(options: dict[str, Any], seed: int, retriever: "Retriever | None" = None) -> MemoryRecommender:
    """METHODS['automr']: the trained retriever chooses the element (deterministic; `seed` reaches the decoder).

    `retriever`: a model in memory instead of the `retriever` folder (train-retriever's early stopping
    on the pipeline's validation metric swaps the model being trained into `rec.selector.retriever`).
    """
    if retriever is not None:
        options = {"retriever": "<in memory>"} | dict(options)
    o = build_config(AutomrOptions, options, source="automr options")
    base = MemoryMethodOptions(**o.model_dump(exclude={"retriever", "queries", "slot_elements"}))
    chooser = RetrieverSelector(retriever if retriever is not None else o.retriever, o.queries, o.slot_elements)
    return MemoryRecommender(base, chooser, seed)


def make_random(options: dict[str, Any], seed: int) -> MemoryRecommender:
    """METHODS['random']: a uniformly random element per sample, a pure function of (seed, user, target time)."""
    return MemoryRecommender(build_config(MemoryMethodOptions, options, source="random options"), RandomSelector(seed), seed)


def make_recent(options: dict[str, Any], seed: int) -> MemoryRecommender:
    """METHODS['recent']: the newest memory element (the one just older than the recent history)."""
    return MemoryRecommender(build_config(MemoryMethodOptions, options, source="recent options"), MostRecentSelector(), seed)


class OracleOptions(MemoryMethodOptions):
    """Options of the `oracle` diagnostic: the retrieval methods' plus the annotations it reads."""

    annotations: Path = Field(description="annotate output of the evaluated samples (their labels choose the element)")


def make_oracle(options: dict[str, Any], seed: int) -> MemoryRecommender:
    """METHODS['oracle']: the element with the highest annotation label (reads the target: an upper bound
    on what retrieval can add to Recall with this recommender, not a method)."""
    o = build_config(OracleOptions, options, source="oracle options")
    base = MemoryMethodOptions(**o.model_dump(exclude={"annotations"}))
    return MemoryRecommender(base, OracleSelector(o.annotations), seed)


__all__ = [
    "AutomrOptions",
    "MemoryMethodOptions",
    "MemoryRecommender",
    "RetrieverSelector",
    "make_automr",
    "make_oracle",
    "make_random",
    "make_recent",
]
