"""What `prepare` reports: stats.json (every count, the settings and where each came from) and
the tables it prints. Kept apart from the engine so the engine reads as the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from automr.data.common import WRONG_FIELDS
from automr.data.protocol import PROTOCOL_FIELDS, PrepareConfig, Window, iso

if TYPE_CHECKING:
    from automr.data.common import CommonFiles
    from automr.data.tally import Tally


def _dist(hist: dict[int, int]) -> dict[str, Any]:
    """min / quantiles / mean / max and a histogram (bins of 10) from value -> count."""
    n = sum(hist.values())
    if n == 0:
        return {"n": 0}
    values = sorted(hist)
    cum, quant = 0, {}
    for v in values:
        cum += hist[v]
        for name, q in (("p10", 0.10), ("p25", 0.25), ("p50", 0.50), ("p75", 0.75), ("p90", 0.90)):
            if name not in quant and cum >= q * n:
                quant[name] = v
    bins: dict[str, int] = {}
    for v in values:
        lo = (v // 10) * 10
        key = "0" if v == 0 else f"{max(lo, 1)}-{lo + 9}"
        bins[key] = bins.get(key, 0) + hist[v]
    mean = round(sum(v * c for v, c in hist.items()) / n, 2)
    return {"n": n, "min": values[0], **quant, "mean": mean, "max": values[-1], "histogram": bins}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def build_stats(
    cfg: PrepareConfig,
    sources: dict[str, str],
    files: CommonFiles,
    cat: Any,
    window: Window,
    tally: Tally,
    n_items: int,
    renamed: int,
    seconds: float,
    n_buckets: int,
) -> dict[str, Any]:
    """Everything prepare counted, as one JSON-able dict (stats.json)."""
    filters = []
    prev = (tally.well_formed - tally.exact_duplicates, tally.users_read, len(tally.items_read))
    for name, step in tally.steps.items():
        if name == "max_users" and not cfg.max_users:
            continue
        left = step.triple()
        filters.append(
            {
                "step": name,
                "interactions_dropped": prev[0] - left[0],
                "users_dropped": prev[1] - left[1],
                "items_dropped": prev[2] - left[2],
                "interactions_left": left[0],
                "users_left": left[1],
                "items_left": left[2],
            }
        )
        prev = left
    stats = {
        "data": str(cfg.data),
        "preset": cfg.preset,
        "files": {"interactions": str(files.interactions), "items": str(files.items)},
        "ignored_columns": files.ignored_columns,
        "settings": {k: getattr(cfg, k) for k in PROTOCOL_FIELDS},
        "setting_sources": sources,
        "window": window.as_stats(),
        "read": {
            "rows": tally.rows,
            "malformed_rows_skipped": tally.rows - tally.well_formed,
            "malformed": tally.malformed.as_stats(),
            "wrong_field_count_rows": tally.malformed.counts[WRONG_FIELDS],
            "wrong_field_count_examples": tally.malformed.examples[WRONG_FIELDS],
            "exact_duplicates_dropped": tally.exact_duplicates,
            "repeated_user_item_time_kept": tally.repeated_user_item_time,
            "users": tally.users_read,
            "items_referenced": len(tally.items_read),
            "time_min": iso(tally.t_min),
            "time_max": iso(tally.t_max),
            "interactions_before_window": tally.before_window,
            "interactions_after_window": tally.after_window,
        },
        "catalogue": cat.as_stats(),
        "filters": filters,
        "out_of_order_timestamps": tally.out_of_order,
        "targets_without_enough_history": tally.targets_without_history,
        "samples": dict(tally.samples),
        "users_per_split": dict(tally.split_users),
        "users": tally.steps["user has no sample"].users,
        "items": n_items,
        "titles_made_unique": renamed,
        "memory_length": {s: _dist(h) for s, h in tally.memory_hist.items()},
        "ties": tie_stats(cfg, tally),
        "max_users": {**tally.max_users, "users_kept": tally.steps["user has no sample"].users, "items_kept": n_items} if tally.max_users else None,
        "repeat_rate": {s: round(tally.repeats[s] / n, 6) if n else None for s, n in tally.samples.items()},
        "performance": {
            "seconds": round(seconds, 2),
            "interactions_per_second": round(tally.rows / seconds) if seconds > 0 else None,
            "peak_rss_mb": peak_rss_mb(),
            "buckets": n_buckets,
        },
    }
    stats["warnings"] = data_warnings(stats)
    return stats


def tie_stats(cfg: PrepareConfig, tally: Tally) -> dict[str, Any]:
    """How often a sample's inputs reach the target's own time (see `ties` in automr/data/protocol.py).

    tie_rate: share of samples whose last recent item has the target's time (0 under strict).
    target_time_shared: share whose target shares its time with an interaction stored before it
    (under pos the same samples; under strict those whose tied interactions were left out).
    """

    def rate(key: str) -> dict[str, float | None]:
        return {s: round(c[key] / tally.samples[s], 4) if tally.samples[s] else None for s, c in tally.ties.items()}

    return {
        "setting": cfg.ties,
        "tie_rate": rate("last_recent_tied"),
        "target_time_shared": rate("target_time_shared"),
        "targets_without_strict_history": tally.targets_without_strict_history,
    }


# --------------------------------------------------------------------------- warnings

# Valid and test splits smaller than this are reported: with n samples one hit moves Recall@K by
# 1/n, and the 95% interval of a recall near 0.1 is about +-1.96 sqrt(0.09 / n), +-0.06 at 100.
MIN_EVAL_SAMPLES = 100


def describe_malformed(malformed: dict[str, dict[str, Any]]) -> str:
    """'value not an integer: 2 (e.g. ...); wrong number of fields: 1 (e.g. ...)' from read.malformed."""
    parts = [f"{reason}: {d['rows']:,} (e.g. {d['examples'][0]})" for reason, d in malformed.items() if d["rows"]]
    return "; ".join(parts) or "no malformed rows"


def data_warnings(stats: dict[str, Any]) -> list[str]:
    """Everything about the data that is legal but likely to mislead, each said once with how to fix it.

    The one home of prepare's warnings: stored as stats.json `warnings` and printed by print_summary.
    """
    found = [_malformed_warning(stats), _duplicate_warning(stats), _repeat_warning(stats), *_split_warnings(stats)]
    found += [_memory_warning(stats), _max_users_warning(stats), _tie_warning(stats)]
    return [w for w in found if w]


def _malformed_warning(stats: dict[str, Any]) -> str | None:
    read = stats["read"]
    if not read["malformed_rows_skipped"]:
        return None
    return (
        f"{read['malformed_rows_skipped']:,} of {read['rows']:,} rows of {stats['files']['interactions']} were skipped as "
        f"malformed: {describe_malformed(read['malformed'])}. Fix or remove those rows if they matter."
    )


def _duplicate_warning(stats: dict[str, Any]) -> str | None:
    n = stats["read"]["exact_duplicates_dropped"]
    if not n:
        return None
    return (
        f"{n:,} rows of {stats['files']['interactions']} are exact duplicates of an earlier row (same user, item, timestamp, "
        "pos and every other column) and were dropped before any filter. Kept, each copy would be the recent history "
        "of its own twin as a target, an answer no recommender should learn."
    )


def _repeat_warning(stats: dict[str, Any]) -> str | None:
    n = stats["read"]["repeated_user_item_time_kept"]
    if not n:
        return None
    return (
        f"{n:,} rows share user, item and timestamp with another row but differ in pos or another column; they are kept "
        "as separate interactions. If the file holds some interactions twice (e.g. appended again with new pos "
        "values), remove the copies: each would be its twin's most recent item."
    )


def _split_warnings(stats: dict[str, Any]) -> list[str]:
    out = []
    for split in ("valid", "test"):
        n = stats["samples"][split]
        if n < MIN_EVAL_SAMPLES:
            use = "early stopping on it chooses epochs by noise" if split == "valid" else "its metrics cannot separate methods"
            out.append(
                f"the {split} split has only {n:,} sample(s) ({stats['users_per_split'][split]:,} users), fewer than the "
                f"{MIN_EVAL_SAMPLES} a measurable evaluation needs: one hit moves Recall@K by {100 / n:.1f} points and the "
                f"95% interval of a recall near 0.1 is +-{1.96 * (0.09 / n) ** 0.5:.2f}, so {use}. Widen the window or "
                "the valid/test periods (valid_size/test_size), relax the filters, or use a preset (--preset NAME)."
            )
    return out


def _memory_warning(stats: dict[str, Any]) -> str | None:
    empty = [s for s, d in stats["memory_length"].items() if d["n"] and d["max"] == 0]
    if not empty:
        return None
    st = stats["settings"]
    which = "every split" if len(empty) == len(stats["memory_length"]) else f"the {', '.join(empty)} split(s)"
    return (
        f"every sample of {which} has an empty memory: no target has more than recent_k={st['recent_k']} earlier "
        f"interactions in its history (max_history={st['max_history']}), so there is nothing to retrieve and "
        "`automr build-memory` will refuse it. Lower --recent-k, or allow longer histories (--max-history, "
        "--history-before-window, a wider window)."
    )


def _max_users_warning(stats: dict[str, Any]) -> str | None:
    m = stats["max_users"]
    if not m:
        return None
    if m["requested"] > m["users_with_samples"]:
        return f"max_users={m['requested']:,} asks for more users than the {m['users_with_samples']:,} that have samples; all of them were kept."
    if m["items_kept"] >= m["items_of_those_users"]:
        return None
    return (
        f"max_users={m['requested']:,} kept {m['users_kept']:,} of the {m['users_with_samples']:,} users with samples, and the "
        f"catalogue (items in their samples) shrinks from {m['items_of_those_users']:,} to {m['items_kept']:,} items: full-ranking "
        "metrics rank fewer candidates and are not comparable with a run on all users."
    )


# Under ties=pos, a tie rate above this is reported: the "next" item is then often an arbitrary pick
# among items of the same instant, ordered only by the stored pos.
MAX_TIE_RATE = 0.10


def _tie_warning(stats: dict[str, Any]) -> str | None:
    rates = {s: r for s, r in stats["ties"]["tie_rate"].items() if r is not None and r > MAX_TIE_RATE}
    if stats["ties"]["setting"] != "pos" or not rates:
        return None
    shown = ", ".join(f"{s} {r:.0%}" for s, r in rates.items())
    return (
        f"the last recent item shares the target's timestamp in {shown} of the samples (ties=pos): within a tie the "
        "order is the file's stored pos (in MovieLens, for one, ascending item id), a shortcut for an id-based model and an "
        "arbitrary 'next' item for all. Use --ties strict to keep only inputs strictly earlier than the target."
    )


def _tie_line(stats: dict[str, Any]) -> str:
    """One summary line: the tie rate per split and, under strict, the targets it skipped."""
    t = stats["ties"]
    rates = ", ".join(f"{s} {r:.1%}" if r is not None else f"{s} -" for s, r in t["tie_rate"].items())
    line = f"  ties={t['setting']}: last recent item at the target's time in {rates} of samples"
    if t["setting"] == "strict":
        shared = ", ".join(f"{s} {r:.1%}" if r is not None else f"{s} -" for s, r in t["target_time_shared"].items())
        line += f"; tied inputs left out in {shared}; {t['targets_without_strict_history']:,} targets without a strictly earlier history skipped"
    return line


def print_summary(console: Any, stats: dict[str, Any]) -> None:
    """The stats as a few compact tables (stderr)."""
    from rich.table import Table

    w, read = stats["window"], stats["read"]
    console.print(
        f"[bold]prepare[/bold] {stats['data']} (preset: {stats['preset'] or 'none, paper protocol'})\n"
        f"  window {w['start']} .. {w['end_exclusive']} (end exclusive); valid from {w['valid_start']}, "
        f"test from {w['test_start']}; history from {w['history_from']}"
    )
    fmt = lambda v: f"{v:,}"  # noqa: E731
    t = Table(title="filters, in order (dropped / left)", title_justify="left")
    for col in ("step", "interactions", "users", "items"):
        t.add_column(col, justify="left" if col == "step" else "right")
    usable = read["rows"] - read["malformed_rows_skipped"] - read["exact_duplicates_dropped"]
    dropped = f"-{fmt(read['malformed_rows_skipped'])} malformed, -{fmt(read['exact_duplicates_dropped'])} exact duplicates"
    t.add_row("read", f"{fmt(usable)} ({dropped})", fmt(read["users"]), fmt(read["items_referenced"]))
    for f in stats["filters"]:
        t.add_row(
            f["step"],
            f"-{fmt(f['interactions_dropped'])} / {fmt(f['interactions_left'])}",
            f"-{fmt(f['users_dropped'])} / {fmt(f['users_left'])}",
            f"-{fmt(f['items_dropped'])} / {fmt(f['items_left'])}",
        )
    console.print(t)
    s = Table(title="samples and memory length (older interactions per sample)", title_justify="left")
    for col in ("split", "samples", "users", "min", "p50", "mean", "p90", "max"):
        s.add_column(col, justify="right")
    for split, n in stats["samples"].items():
        d = stats["memory_length"][split]
        s.add_row(split, fmt(n), fmt(stats["users_per_split"][split]), *(str(d.get(k, "")) for k in ("min", "p50", "mean", "p90", "max")))
    console.print(s)
    rates = ", ".join(f"{k} {v:.2%}" for k, v in stats["repeat_rate"].items() if v is not None)
    console.print(f"  repeat rate (target already in the history): {rates}")
    hist = stats["memory_length"]["train"].get("histogram", {})
    if hist:
        top = max(hist.values())
        console.print("  memory length histogram (train):")
        for k, v in hist.items():
            console.print(f"  {k:>7} {'#' * max(1, round(30 * v / top)):<30} {v:,}")
    p = stats["performance"]
    console.print(
        f"  {stats['users']:,} users, {stats['items']:,} items ({stats['titles_made_unique']:,} titles made unique), "
        f"{stats['out_of_order_timestamps']:,} out-of-order timestamps re-ordered, "
        f"{stats['targets_without_enough_history']:,} targets with < min_recent earlier interactions skipped\n"
        f"{_tie_line(stats)}\n"
        f"  {read['rows']:,} interactions in {p['seconds']} s = {p['interactions_per_second']:,} interactions/s; "
        f"peak memory {p['peak_rss_mb']:,} MB; {p['buckets']} bucket(s)"
    )
    for warning in stats["warnings"]:  # soft_wrap: one line each, so logs can be searched
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
