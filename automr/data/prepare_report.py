"""What `prepare` reports: stats.json (every count, the settings and where each came from) and
the tables it prints. Kept apart from the engine so the engine reads as the protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
    prev = (tally.well_formed, tally.users_read, len(tally.items_read))
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
    return {
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
            "wrong_field_count_rows": tally.skipped.count,
            "wrong_field_count_examples": tally.skipped.examples,
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
        "repeat_rate": {s: round(tally.repeats[s] / n, 6) if n else None for s, n in tally.samples.items()},
        "performance": {
            "seconds": round(seconds, 2),
            "interactions_per_second": round(tally.rows / seconds) if seconds > 0 else None,
            "peak_rss_mb": peak_rss_mb(),
            "buckets": n_buckets,
        },
    }


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
    t.add_row("read", f"{fmt(read['rows'] - read['malformed_rows_skipped'])} (-{fmt(read['malformed_rows_skipped'])} malformed)", fmt(read["users"]), fmt(read["items_referenced"]))
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
        f"  {read['rows']:,} interactions in {p['seconds']} s = {p['interactions_per_second']:,} interactions/s; "
        f"peak memory {p['peak_rss_mb']:,} MB; {p['buckets']} bucket(s)"
    )
