"""The soak's report (bench/bench_soak.py): percentiles, RSS slopes per 1,000 requests and the `## Soak`
section of BENCHMARKS.md, from the run's raw results."""

from __future__ import annotations

import math
import statistics
from typing import Any

from report import table


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def slope_per_1000(samples: list[dict[str, Any]], key: str, after: int = 1) -> float:
    """Least-squares MB per 1,000 requests over the samples under load with at least `after` requests."""
    points = [(s["requests"], s[key]) for s in samples if s["requests"] >= after and s["label"] == "under load"]
    if len(points) < 3:
        return float("nan")
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


# ---------------------------------------------------------------- report


def signed(value: float) -> str:
    return "n/a (too few samples)" if math.isnan(value) else f"{value:+.2f}"


def variant(run: dict[str, Any]) -> str:
    """What a run changed from the default mix and environment, if anything."""
    parts = [f"only {', '.join(run['only'])}"] if run.get("only") else []
    parts += [f"{k}={v}" for k, v in sorted((run.get("malloc_env") or {}).items())]
    return "; " + "; ".join(parts) if parts else ""


def render(results: dict[str, Any]) -> str:
    run = results["run"]
    samples = results["samples"]
    base = next(s for s in samples if s["label"].startswith("after warm-up"))
    end = samples[-1]
    total = sum(results["requests"].values())
    errors = sum(results["errors"].values())
    outcomes = results["outcomes"]
    rows = []
    for kind in sorted(results["requests"], key=lambda k: -results["requests"][k]):
        latency = results["latency_ms"].get(kind, {})
        rows.append(
            {
                "kind": kind,
                "requests": results["requests"][kind],
                "ok": outcomes.get(f"{kind}|ok", 0),
                "abandoned": outcomes.get(f"{kind}|abandoned", 0),
                "overloaded": outcomes.get(f"{kind}|overloaded", 0),
                "errors": outcomes.get(f"{kind}|error", 0),
                "hits": results["cache_hits"].get(kind, 0),
                "p50": f"{latency['p50']:.0f}" if latency else "",
                "p95": f"{latency['p95']:.0f}" if latency else "",
            }
        )
    columns = [
        ("kind", "kind"),
        ("requests", "requests"),
        ("ok", "ok"),
        ("abandoned", "abandoned by the client"),
        ("overloaded", "503 + Retry-After"),
        ("errors", "errors"),
        ("hits", "X-Cache: HIT"),
        ("p50", "ok p50 ms"),
        ("p95", "ok p95 ms"),
    ]
    sample_rows = [
        {
            "when": s["label"],
            "t": f"{s['t']:.0f}",
            "requests": s["requests"],
            "rss": f"{s['rss_mb']:.1f}",
            "anon": f"{s['anon_mb']:.1f}",
            "fds": s["fds"],
            "sockets": s["fd_kinds"].get("socket", 0),
            "threads": s["threads"],
            "cache": f"{s.get('cache_entries', '')} / {s.get('cache_mb', '')}",
            "load": f"{s['load1']:.1f}",
        }
        for s in samples
    ]
    sample_columns = [
        ("when", "sample"),
        ("t", "t s"),
        ("requests", "soak requests"),
        ("rss", "VmRSS MB"),
        ("anon", "RssAnon MB"),
        ("fds", "open fds"),
        ("sockets", "of which sockets"),
        ("threads", "threads"),
        ("cache", "cache entries / MB"),
        ("load", "load avg 1 min"),
    ]
    growth = end["rss_mb"] - base["rss_mb"]
    anon_growth = end["anon_mb"] - base["anon_mb"]
    per_1000 = 1000 * growth / total if total else float("nan")
    anon_per_1000 = 1000 * anon_growth / total if total else float("nan")
    log = results["log"]
    lines = [
        f"Measured {run['date']} with `.venv/bin/python bench/bench_soak.py --seconds {run['seconds']:.0f} "
        f"--warmup {run['warmup']:.0f}` "
        f"on {run['machine']}: the real `server.py` from {run['source']} on its embedded defaults (packaged "
        "Gemma 3 270M Q4_K_M on `light`, MiniLM on `embedding`, the similarity reranker; memory cache on), "
        f"a temporary working directory, HF_HUB_OFFLINE=1, loopback. {run['workers']} closed-loop async clients "
        f"sent a weighted mix for {run['warmup']:.0f} s of warm-up, then {results['wall_s']:.0f} s of soak "
        f"(the numbers below; seed {run['seed']}{variant(run)}). Chat and completions ask for 4-16 tokens; "
        "abandoned streams (64 tokens, end tokens banned) are dropped after 1-4 chunks, abandoned requests "
        "after a 0.2-1.0 s client timeout. **The 2 cores were shared with other engineers' work**: 1-minute "
        f"load average {run['load_start']:.1f} at the start, {run['load_end']:.1f} at the end (samples below), "
        "so latencies are pessimistic; the counts, memory and fds are what this section is about.",
        "",
        table(rows, columns),
        "",
        f"- **Requests: {total}** in {results['wall_s']:.0f} s ({total / results['wall_s']:.1f}/s); "
        f"**errors: {errors}** (target 0)"
        + (": " + "; ".join(f"{k} x{n}" for k, n in sorted(results["errors"].items())) if errors else "")
        + f". Warm-up: {sum(results['warmup']['requests'].values())} requests, "
        f"{sum(results['warmup']['errors'].values())} errors.",
        "",
        table(sample_rows, sample_columns),
        "",
        f"- **RSS after warm-up vs end** (both with no request in flight): {base['rss_mb']:.1f} MB -> "
        f"{end['rss_mb']:.1f} MB ({growth:+.1f} MB, {per_1000:+.2f} MB per 1,000 requests); anonymous memory "
        f"{base['anon_mb']:.1f} -> {end['anon_mb']:.1f} MB ({anon_growth:+.1f} MB, {anon_per_1000:+.2f} MB per "
        f"1,000 requests). Least-squares slope over the samples under load: "
        f"{signed(results['slope_rss'])} MB VmRSS, {signed(results['slope_anon'])} MB RssAnon per 1,000 requests "
        f"(second half of the soak only: {signed(results['slope_rss_2nd_half'])} and "
        f"{signed(results['slope_anon_2nd_half'])}).",
        f"- **Open fds**: {samples[0]['fds']} idle before any request, {base['fds']} after warm-up, "
        f"{end['fds']} at the end; threads {samples[0]['threads']} -> {base['threads']} -> {end['threads']}.",
        f"- **Nothing left running**: {results['settle_end_s']:.1f} s after the last client stopped, /health and "
        "/metrics showed "
        + (
            "no request in flight, no active sequence, no queue"
            if not results["busy_at_end"]
            else f"still busy: {results['busy_at_end']}"
        )
        + f"; /health status at the end: `{results['health_end'].get('status')}`.",
    ]
    for probe in results["probes"]:
        what = "stream dropped after 2 chunks" if probe["streamed"] else "non-streamed request given up after 0.5 s"
        lines.append(
            f"- **Abandon probe, {what}** (400 tokens asked, end tokens banned): the light tier computed nothing "
            f"{probe['stop_s']:.2f} s after the client left (client outcome: {probe['outcome']})."
        )
    lines.append(
        f"- **Server log** (LOG_LEVEL=warning): {log['tracebacks']} tracebacks, {log['error_lines']} ERROR lines, "
        f"{log['warning_lines']} WARNING lines; exit code after SIGINT {results['exit_code']}."
        + "".join(f" Distinct: `{m}` x{n}." for m, n in log["distinct_errors"].items())
    )
    return "\n".join(lines)
