"""The Python API of a trained run: load it once, recommend for a history (the server, the CLI, notebooks).

A run is what `automr evaluate` wrote: its config.yaml names the prepared data, the methods and each
method's options (adapter, memory store, retriever), and its eval.json the history exclusion it applied.
`load_run` reads them back and builds every method through the registry with exactly those options,
fitted in the run's own methods/<name> folder (where the evaluator fitted it: SASRec reloads its
weights, BIGRec its grounding cache). `Run.recommend(history)` turns a history into the one-row samples
frame every method reads (the last K interactions recent, the older ones memory, as `prepare` cuts them)
and calls the method's own `recommend`: the same prompt, decoder and retrieval code as the evaluator,
so the answer equals the offline one for the same sample (tests/test_serve_api.py). Nothing is
reimplemented here; this module only adds the "why" (retrieved element and its score, the recent
window, fingerprints, timings) read from what the method kept of its last call.

    run = load_run("runs/demo/eval")
    rec = run.recommend(History(items=[50, 172, 133], times=[t0, t1, t2]), method="automr", k=10)
    rec.items[0].title, rec.retrieved, rec.timings_ms

`RUN` may also be a folder holding exactly one evaluate run (runs/demo), or a pipeline YAML whose
evaluate stage names it (configs/demo.yaml).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from automr.config import read_yaml
from automr.data.schema import SAMPLE_SCHEMA, SPLITS, PreparedData
from automr.errors import UserError
from automr.eval.ranking import RankingSpec, keep_ranking, resolve_exclude_history
from automr.utils.fingerprint import catalogue_hash, path_fingerprint
from automr.utils.io import read_json
from automr.utils.method_names import CLASSIC_METHODS, method_kind

if TYPE_CHECKING:  # pragma: no cover
    from automr.memory.store import MemoryStore
    from automr.methods.base import Recommender

FALLBACK = "popularity"  # what a user without history gets, labelled as such
MAX_K = 100
MEMORY_METHODS = {"automr", "recent", "random", "rella"}  # methods that put a memory element in the slot


# ---------------------------------------------------------------------------------------------
# What goes in and what comes out
# ---------------------------------------------------------------------------------------------
class History(BaseModel):
    """A user's interactions, oldest first (ties in time keep this order, as `pos` does offline)."""

    items: list[int] = Field(default_factory=list, description="item ids, oldest first")
    times: list[int] = Field(default_factory=list, description="unix seconds, one per item, non-decreasing")

    @classmethod
    def of_sample(cls, row: dict[str, Any]) -> History:
        """The history behind a prepared sample (a row of a split, as a dict): its memory, then its recent
        window (`Run.sample` cuts a history back into them)."""
        return cls(items=[*row["memory_items"], *row["recent_items"]], times=[*row["memory_times"], *row["recent_times"]])

    def problems(self, catalogue: set[int] | None = None) -> list[str]:
        """Every mistake in the history (empty when it is usable)."""
        out = []
        if len(self.items) != len(self.times):
            out.append(f"{len(self.items)} items but {len(self.times)} times; give one time per item")
        back = [i for i in range(1, min(len(self.items), len(self.times))) if self.times[i] < self.times[i - 1]]
        if back:
            out.append(f"times must not decrease (oldest first); interaction {back[0]} is earlier than the one before it")
        if catalogue is not None:
            unknown = sorted({i for i in self.items if i not in catalogue})
            if unknown:
                out.append(f"{len(unknown)} item id(s) not in the catalogue: {', '.join(map(str, unknown[:10]))}")
        return out


class Interaction(BaseModel):
    item_id: int
    title: str
    time: int


class RankedItem(BaseModel):
    rank: int = Field(description="1 = best")
    item_id: int
    title: str
    score: float | None = Field(description="the method's own score of the item (see score_kind); None where it has none")
    score_kind: str


class Retrieved(BaseModel):
    """A memory element put in the slot, and why: the retriever's score and its rank in the user's memory."""

    item_id: int
    title: str
    time: int
    score: float | None = Field(description="retriever softmax score S over the user's memory (AutoMR); None for other selectors")
    rank: int | None = Field(description="1 = the retriever's best among the user's memory elements")
    memory_size: int = Field(description="elements the selector chose from (those the store held)")


class Recommendation(BaseModel):
    method: str = Field(description="the method that ranked (popularity for a user without history)")
    label: str = Field(description="what the ranking is, in words")
    items: list[RankedItem]
    retrieved: list[Retrieved] = Field(description="the memory elements in the slot, best first (empty: none)")
    recent: list[Interaction] = Field(description="the recent window the prompt was built from, oldest first")
    memory: list[Interaction] = Field(description="the older interactions the memory holds for this request, oldest first")
    memory_missing: int = Field(0, description="memory interactions whose element the store does not hold (yet)")
    exclude_history: bool
    fingerprints: dict[str, str]
    timings_ms: dict[str, float] = Field(description="milliseconds of the model call that answered, by step")
    batch: int = Field(1, description="requests answered by that one model call (the server batches concurrent ones)")


# ---------------------------------------------------------------------------------------------
# Finding and loading a run
# ---------------------------------------------------------------------------------------------
def _is_evaluate_config(data: Any) -> bool:
    return isinstance(data, dict) and {"samples", "methods", "run"} <= set(data)


def find_evaluate_settings(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(evaluate settings, evaluate run folder) of an evaluate folder, a folder holding one, or a pipeline YAML."""
    path = Path(path)
    if path.is_file():
        stages = read_yaml(path).get("stages") or {}
        found = [dict(s) for s in stages.values() if isinstance(s, dict) and s.get("stage", None) in (None, "evaluate")
                 and _is_evaluate_config(s)]
        if not found:
            raise UserError(f"{path} has no evaluate stage; serve a run folder or a pipeline YAML with an `evaluate:` section")
        found[0].pop("stage", None)
        return found[0], Path(found[0]["run"])
    if not path.is_dir():
        raise UserError(f"no run at {path}: expected an `automr evaluate` output folder, a folder holding one, or a pipeline YAML")
    if (path / "config.yaml").is_file() and _is_evaluate_config(cfg := read_yaml(path / "config.yaml")):
        return cfg, path
    inner = sorted(p.parent for p in path.glob("*/config.yaml") if _is_evaluate_config(read_yaml(p)))
    if len(inner) == 1:
        return read_yaml(inner[0] / "config.yaml"), inner[0]
    what = f"it holds {len(inner)} ({', '.join(p.name for p in inner)}); name one" if inner else "none was found in it"
    raise UserError(f"{path} is not an `automr evaluate` output folder (no config.yaml with samples, methods and run), and {what}")


def load_run(path: str | Path, *, preload: Sequence[str] = ()) -> Run:
    """Load a trained run (see the module docstring); `preload` fits those methods now rather than on first use."""
    settings, folder = find_evaluate_settings(path)
    run = Run(folder, settings)
    for name in preload:
        run.method(name)
    return run


class Run:
    """A loaded run: its data, its methods (built and fitted on first use) and how it cuts histories.

    One recommendation runs at a time (`lock`): the methods keep per-call state (the last choices,
    hypotheses and timings) and share one model.
    """

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.data = PreparedData.load(settings["samples"])
        self.titles = self.data.titles()
        self.catalogue = np.unique(self.data.items["item_id"].to_numpy().astype(np.int64))
        self.options: dict[str, dict[str, Any]] = dict(settings.get("method_options") or {})
        self.method_names: list[str] = list(dict.fromkeys([*settings["methods"], FALLBACK]))
        self.seed = int(settings.get("seed", 0))
        self.exclude_history = self._exclusion(settings)
        self.recent_k, self.history_cap = self._window()
        self.lock = threading.RLock()
        self._built: dict[str, Recommender] = {}
        self._fingerprints: dict[str, dict[str, str]] = {}

    def _exclusion(self, settings: dict[str, Any]) -> bool:
        """The evaluator's own choice (eval.json), else its setting resolved the way it resolves it."""
        info = self.folder / "eval.json"
        if info.is_file() and isinstance(read_json(info).get("exclude_history"), bool):
            return bool(read_json(info)["exclude_history"])
        return resolve_exclude_history(settings.get("exclude_history", "auto"), self.data)[0]

    def _window(self) -> tuple[int, int]:
        """(K, history cap) as `prepare` cut the samples: its config where it says, else what the samples show."""
        prep = self.data.root / "config.yaml"
        cfg = read_yaml(prep) if prep.is_file() else {}
        frames = [self.data.split(s) for s in SPLITS]
        longest = max((int(df.select(pl.col("recent_items").list.len()).max().item() or 0) for df in frames if df.height), default=0)
        k = int(cfg.get("recent_k") or longest or 10)
        seen = max((int(df.select(pl.col("recent_items").list.len() + pl.col("memory_items").list.len()).max().item() or 0)
                    for df in frames if df.height), default=0)
        cap = int(cfg.get("max_history") or 0) or max(seen, k)
        return k, cap

    # -- methods ------------------------------------------------------------------------------
    def method(self, name: str) -> Recommender:
        """The method `name` with the run's options, fitted where the evaluator fitted it (once)."""
        if name not in self.method_names:
            raise UserError(f"method {name!r} is not served by this run; served: {', '.join(self.method_names)}")
        with self.lock:
            if name not in self._built:
                from automr.methods.registry import make_method

                rec = make_method(name, self.options.get(name), self.seed)
                rec.ranking_excludes_history = self.exclude_history  # as the evaluator tells it
                self._share_models(rec)
                rec.fit(self.data, self.folder / "methods" / name)
                self._built[name] = rec
            return self._built[name]

    def _share_models(self, rec: Recommender) -> None:
        """Give a generative method the language model an already-fitted one loaded with the same options."""
        from automr.methods.bigrec import GenerativeRecommender

        if not isinstance(rec, GenerativeRecommender):
            return
        key = _model_key(rec.options)
        for other in self._built.values():
            if isinstance(other, GenerativeRecommender) and _model_key(other.options) == key:
                rec.lm, rec.base_lm = other.lm, other.base_lm
                return

    def memory_method(self) -> Any:
        """The memory method whose model, layer and store the elements belong to (automr first); None without one."""
        from automr.methods.automr import MemoryRecommender

        for name in sorted((n for n in self.method_names if method_kind(n) in MEMORY_METHODS), key=lambda n: n != "automr"):
            rec = self.method(name)
            if isinstance(rec, MemoryRecommender) and rec.store is not None:
                return rec
        return None

    def fingerprints(self, name: str) -> dict[str, str]:
        """Short digests of what a method's answer depends on: model/adapter, memory store, retriever, catalogue."""
        if name not in self._fingerprints:
            opts = self.options.get(name) or {}
            fp = {"catalogue": catalogue_hash(self.data.items)}
            for key in ("adapter", "memory", "retriever"):
                if opts.get(key):
                    fp[key] = _digest(path_fingerprint(Path(opts[key])))
            if method_kind(name) not in CLASSIC_METHODS:
                fp["model"] = str(opts.get("model", "smollm2"))
            self._fingerprints[name] = fp
        return self._fingerprints[name]

    # -- histories ----------------------------------------------------------------------------
    def check(self, history: History) -> None:
        problems = history.problems(set(self.titles))
        if problems:
            raise UserError("bad history: " + "; ".join(problems))

    def sample(self, history: History, user_id: int = -1, at: int | None = None) -> pl.DataFrame:
        """The one-row samples frame of the next interaction after `history` (at time `at`, default its last
        time): its last K interactions are the recent window, the older ones (up to the cap) the memory."""
        items, times = list(history.items), list(history.times)
        n = len(items)
        start, mem_start = max(0, n - self.recent_k), max(0, n - self.history_cap)
        row = {
            "user_id": int(user_id), "target_item": -1,
            "target_time": int(at if at is not None else (times[-1] if times else 0)),
            "recent_items": items[start:], "recent_times": times[start:],
            "memory_items": items[mem_start:start], "memory_times": times[mem_start:start],
        }
        return pl.DataFrame([row], schema=SAMPLE_SCHEMA)

    def interactions(self, items: Sequence[int], times: Sequence[int]) -> list[Interaction]:
        return [Interaction(item_id=int(i), title=self.titles.get(int(i), "?"), time=int(t)) for i, t in zip(items, times)]

    # -- recommending -------------------------------------------------------------------------
    def recommend(
        self,
        history: History,
        method: str = "automr",
        k: int = 10,
        *,
        user_id: int | None = None,
        at: int | None = None,
        store: MemoryStore | None = None,
    ) -> Recommendation:
        """Top k items for the next interaction after `history`, with the why.

        Memory elements come from `store` (the server's), else the method's own store (build-memory's,
        for the run's users, given `user_id`); a history with neither (`user_id` None) gets its
        elements computed into a scratch store with build-memory's code. An empty history gets
        popularity, labelled as such.
        """
        return self.recommend_batch([history], method, k, user_ids=[user_id], at=[at], store=store)[0]

    def recommend_batch(
        self,
        histories: Sequence[History],
        method: str = "automr",
        k: int = 10,
        *,
        user_ids: Sequence[int | None] | None = None,
        at: Sequence[int | None] | None = None,
        store: MemoryStore | None = None,
    ) -> list[Recommendation]:
        """`recommend` for several histories in one model call: one batched beam search, so the model's
        weights are read once per step for every request (the server's batching). Each answer equals
        the one `recommend` gives alone. Histories with neither `store` nor a user id get scratch
        memories, one each, so they are answered one at a time."""
        n = len(histories)
        user_ids = list(user_ids) if user_ids is not None else [None] * n
        at = list(at) if at is not None else [None] * n
        if not 1 <= k <= MAX_K:
            raise UserError(f"k must be between 1 and {MAX_K}, got {k}")
        if not (len(user_ids) == len(at) == n):
            raise ValueError(f"{n} histories, {len(user_ids)} user ids and {len(at)} times")
        for h in histories:
            self.check(h)
        out: list[Recommendation | None] = [None] * n
        groups: dict[str, list[int]] = {}  # the method that answers -> requests; an empty history gets popularity
        for j, h in enumerate(histories):
            groups.setdefault(method if h.items else FALLBACK, []).append(j)
        for name, idx in groups.items():
            if store is None and any(user_ids[j] is None for j in idx) and len(idx) > 1:
                chunks = [[j] for j in idx]  # each needs its own scratch store
            else:
                chunks = [idx]
            for chunk in chunks:
                answers = self._answer(name, [histories[j] for j in chunk], [user_ids[j] for j in chunk],
                                       [at[j] for j in chunk], k, store)
                for j, a in zip(chunk, answers):
                    out[j] = a
        return [a for a in out if a is not None]

    def _answer(self, name: str, histories: list[History], user_ids: list[int | None], at: list[int | None], k: int,
                store: MemoryStore | None) -> list[Recommendation]:
        """One model call of method `name` for these histories (one scratch history at most)."""
        rec = self.method(name)
        label = name if histories[0].items else f"{FALLBACK}: no history yet"
        sample = pl.concat([self.sample(h, -1 if u is None else u, t) for h, u, t in zip(histories, user_ids, at)])
        spec = RankingSpec.for_samples(self.data, sample, k, self.exclude_history)
        t0 = time.perf_counter()
        with self.lock, ExitStack() as stack:
            stack.enter_context(self._memory_for(rec, histories[0], user_ids[0], store))
            got = np.asarray(rec.recommend(sample, spec.depth))
            ranking, _ = keep_ranking(got, sample, spec)
            timings = _timings_ms(rec, time.perf_counter() - t0)
            return [Recommendation(
                method=name, label=label, items=self._ranked(rec, ranking[b], b), retrieved=self._retrieved(rec, sample, b),
                recent=self.interactions(sample["recent_items"][b], sample["recent_times"][b]),
                memory=self.interactions(sample["memory_items"][b], sample["memory_times"][b]),
                memory_missing=self._missing(rec, sample, b), exclude_history=self.exclude_history,
                fingerprints=self.fingerprints(name), timings_ms=timings, batch=len(histories),
            ) for b in range(len(histories))]

    @contextmanager
    def _memory_for(self, rec: Recommender, history: History, user_id: int | None, store: MemoryStore | None) -> Iterator[None]:
        """Point a memory method at the right store for this request (see `recommend`)."""
        from automr.methods.automr import MemoryRecommender

        if not isinstance(rec, MemoryRecommender) or rec.store is None:
            yield
            return
        if store is not None:
            with rec.serving_store(store):
                yield
            return
        if user_id is not None:
            yield
            return
        with tempfile.TemporaryDirectory(prefix="automr-history-") as tmp:
            scratch = scratch_store(rec, Path(tmp) / "memory", history, self.recent_k, self.history_cap)
            try:
                with rec.serving_store(scratch):
                    yield
            finally:
                scratch.close()

    def _ranked(self, rec: Recommender, ids: np.ndarray, b: int) -> list[RankedItem]:
        scores = _item_scores(rec, b)
        out = []
        for r, i in enumerate(int(x) for x in ids if x >= 0):
            score, kind = scores(i)
            out.append(RankedItem(rank=r + 1, item_id=i, title=self.titles.get(i, "?"), score=score, score_kind=kind))
        return out

    def _retrieved(self, rec: Recommender, sample: pl.DataFrame, b: int) -> list[Retrieved]:
        """Row b's memory elements in the slot, with the retriever's score and rank among its memory."""
        from automr.methods.automr import MemoryRecommender, RetrieverSelector

        if not isinstance(rec, MemoryRecommender) or not rec.last_choices:
            return []
        choice = rec.last_choices[b]
        items, times = sample["memory_items"][b].to_list(), sample["memory_times"][b].to_list()
        avail, scores = (np.arange(len(items)), None)
        if isinstance(rec.selector, RetrieverSelector) and rec.selector.last_inputs is not None:
            avail, scores = rec.selector.scores_of_last(b)
        elif rec.store is not None and items:
            avail = np.flatnonzero(rec.memory_rows(sample[b : b + 1])[0] >= 0)
        out = []
        for j in choice:
            score = rank = None
            if scores is not None and len(scores):
                pos = int(np.flatnonzero(avail == j)[0])
                score, rank = float(scores[pos]), int((scores > scores[pos]).sum()) + 1
            out.append(Retrieved(item_id=int(items[j]), title=self.titles.get(int(items[j]), "?"), time=int(times[j]),
                                 score=score, rank=rank, memory_size=len(avail)))
        return out

    def _missing(self, rec: Recommender, sample: pl.DataFrame, b: int) -> int:
        from automr.methods.automr import MemoryRecommender

        if not isinstance(rec, MemoryRecommender) or rec.store is None or not len(sample["memory_items"][b]):
            return 0
        return int((rec.memory_rows(sample[b : b + 1])[0] < 0).sum())


# ---------------------------------------------------------------------------------------------
# Memory for a history that no store holds
# ---------------------------------------------------------------------------------------------
def compute_elements(rec: Any, store: MemoryStore, user_id: int, history: History, positions: Sequence[int], window: int) -> np.ndarray:
    """Compute the elements at `positions` of a user's history with build-memory's code and append them
    to `store` (the caller holds its writer); returns their rows. `rec`: a fitted MemoryRecommender."""
    from automr.memory.build import UserHistory, append_elements

    hist = UserHistory(int(user_id), list(history.items), list(history.times))
    els = element_states(rec, hist, positions, window, store.meta.max_value_tokens, store.meta.value_kind)
    before = len(store)
    append_elements(store, {hist.user_id: hist}, els)
    return np.arange(before, len(store), dtype=np.int64)


def element_states(rec: Any, history: Any, positions: Sequence[int], window: int, value_tokens: int,
                   value_kind: str) -> list[tuple]:
    """The elements (user, pos, key, value) at `positions` of a `UserHistory`, computed by `rec`'s model, prompt
    builder and batch size exactly as build-memory computes them (the server's memory worker calls it too)."""
    from automr.memory.build import history_elements

    return history_elements(rec.split, rec.builder, rec.titles, history, list(positions), window=window,
                            value_tokens=value_tokens, value_kind=value_kind, batch_size=rec.mopts.build_batch_size)


def create_like(folder: Path, template: MemoryStore, *, durable: bool, extra: dict[str, Any] | None = None) -> MemoryStore:
    """An empty store with `template`'s layout (hidden size, value length, layer, model, value kind), open to append."""
    from automr.memory.store import MemoryStore

    m = template.meta
    return MemoryStore.create(
        folder, m.hidden_size, m.max_value_tokens, m.value_dtype, layer=m.layer, model_name=m.model_name,
        mode="exact", value_kind=m.value_kind, extra={"like": str(template.folder), **(extra or {})}, durable=durable,
    )


def scratch_store(rec: Any, folder: Path, history: History, window: int, cap: int) -> MemoryStore:
    """A store holding the memory elements of one history (user -1), built exactly as build-memory builds them."""
    assert rec.store is not None
    store = create_like(folder, rec.store, durable=False)
    n = len(history.items)
    compute_elements(rec, store, -1, history, range(max(0, n - cap), max(0, n - window)), window)
    return store


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _model_key(options: Any) -> str:
    return json.dumps([str(options.adapter), options.model, options.device, options.dtype, options.grounding_model])


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _item_scores(rec: Any, b: int) -> Any:
    """item id -> (score, kind) of row b, from what the method kept of its last call."""
    from automr.methods.bigrec import GenerativeRecommender
    from automr.methods.popularity import PopularityRecommender

    if isinstance(rec, PopularityRecommender):
        return lambda i: (float(rec.counts.get(i, 0)), "interactions before the validation period")
    if isinstance(rec, GenerativeRecommender) and rec.grounding is not None:
        beams = {h.item: h.score for h in (rec.last_hypotheses[b] if rec.last_hypotheses else []) if h.item is not None}
        dist = {int(i): float(d) for i, d in zip(rec.last_ranking[b], rec.last_distances[b]) if not np.isnan(d)}

        def score(i: int) -> tuple[float | None, str]:
            if i in beams:
                return float(beams[i]), "beam log-probability / length ** length_penalty"
            if i in dist:
                return -dist[i], "minus the L2 grounding distance to the best beam's text"
            return None, "none"

        return score
    return lambda i: (None, "none (the method exposes no per-item score)")


def _timings_ms(rec: Any, total_s: float) -> dict[str, float]:
    steps = dict(getattr(rec, "timings", {}) or {})
    out = {k.removesuffix("_s") + "_ms": round(1000 * v, 3) for k, v in steps.items()}
    out["total_ms"] = round(1000 * total_s, 3)
    return out


__all__ = ["History", "Recommendation", "Run", "compute_elements", "create_like", "find_evaluate_settings", "load_run"]
