"""write_report(): one self-contained HTML page (inline SVG, no network) and a PNG beside it, from sweep outputs
(OUT or OUT/results.json) and artifact directories (their manifest.json)."""

from __future__ import annotations

import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any

from optpipe.artifact import Artifact
from optpipe.errors import ArtifactError, OutputError
from optpipe.sweep.charts import Point, draw, pareto_front, to_png, to_svg
from optpipe.sweep.jobs import manifest_facts
from optpipe.sweep.results import RESULTS

# The fidelity axis: the first of these every point of a model has (encoders: cosine; classifiers: top-1
# agreement; generators: next-token agreement).
FIDELITY = ("mean_cosine", "top1_agreement", "next_token_agreement", "greedy_match")
LATENCY = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")


def _from_results(file: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(file.read_text())["results"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{file} is not a sweep results file ({exc})") from None


def _from_artifact(path: Path) -> dict[str, Any]:
    manifest = Artifact.load(path).manifest
    model = manifest.get("source", {}).get("id", "?")
    record = {"job": path.name, "model": model, "model_name": model.rstrip("/").split("/")[-1],
              "target": manifest.get("target", {}).get("name", "?"), "grid": {}, "status": "ok",
              "artifact": str(path), **manifest_facts(manifest)}
    timed = manifest.get("bench", {})
    if timed.get("rows"):
        first = timed["rows"][0]
        record["bench"] = {**{k: first.get(k) for k in (*LATENCY, "sequences_per_s", "batch", "seq", "workload")},
                           "rows": timed["rows"]}
        record["machine"] = timed.get("machine")
        record["bench_isolation"] = {"mode": "optpipe run --bench",
                                     "how": "timed once on the staged artifact by `optpipe run --bench`; nothing is "
                                            "known of what else ran on the machine"}
    return record


def collect(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Records from sweep outputs and artifact directories, each artifact once (the first mention wins)."""
    records: list[dict[str, Any]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            records += _from_results(path)
        elif (path / RESULTS).is_file():
            records += _from_results(path / RESULTS)
        elif (path / "manifest.json").is_file():
            records.append(_from_artifact(path))
        else:
            raise ArtifactError(f"{path} is neither a sweep output (no {RESULTS}) nor an artifact (no manifest.json)")
    seen, unique = set(), []
    for record in records:
        key = str(Path(record["artifact"]).resolve()) if record.get("artifact") else f"{record['job']}:{id(record)}"
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def _label(record: dict[str, Any]) -> str:
    grid = ",".join(f"{k.split('.')[-1]}={v}" for k, v in (record.get("grid") or {}).items())
    return record["target"] + (f" [{grid}]" if grid else "")


def panels(records: list[dict[str, Any]]) -> list[tuple[str, str, list[Point], str]]:
    """Per model: its fidelity metric, its points (timed ok records) with the Pareto front, and a caution when
    its latencies come from different CPUs."""
    out = []
    timed = [r for r in records if r.get("status") == "ok" and (r.get("bench") or {}).get("p50_ms") is not None]
    for model in dict.fromkeys(r.get("model_name") or r["model"] for r in timed):
        mine = [r for r in timed if (r.get("model_name") or r["model"]) == model]
        metric = next((m for m in FIDELITY if all(m in r.get("validation", {}) for r in mine)), None) or next(
            (m for m in FIDELITY if any(m in r.get("validation", {}) for r in mine)), None)
        if metric is None:
            continue
        mine = [r for r in mine if metric in r.get("validation", {})]
        pairs = [(float(r["bench"]["p50_ms"]), float(r["validation"][metric])) for r in mine]
        front = pareto_front(pairs)
        points = [Point(r["job"], _label(r), x, y, i in front) for i, (r, (x, y)) in enumerate(zip(mine, pairs))]
        cpus = {(r.get("machine") or {}).get("cpu") for r in mine}
        note = "timed on different CPUs: compare with care" if len(cpus) > 1 else ""
        out.append((model, metric, points, note))
    return out


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{'' if c is None else html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def _jobs_table(records: list[dict[str, Any]], on_front: set[str], metric_of: dict[str, str]) -> str:
    rows = []
    for r in records:
        b, v = r.get("bench") or {}, r.get("validation") or {}
        metric = metric_of.get(r["job"]) or next((m for m in FIDELITY if m in v), None)
        rows.append([r["job"], r.get("model_name") or r["model"], r["target"],
                     ", ".join(f"{k}={x}" for k, x in (r.get("grid") or {}).items()), r["status"],
                     *(_num(b.get(k)) for k in LATENCY), _num(b.get("sequences_per_s"), 1),
                     f"{metric} {v[metric]:.4f}" if metric and metric in v else "",
                     _num((r.get("size") or {}).get("onnx_bytes", 0) / 1e6, 2) if r.get("size") else "",
                     _num((r.get("bench_isolation") or {}).get("load_1m_at_start"), 1),
                     _num(r.get("seconds"), 1), (r.get("host") or "") + (f" {r['node'][:8]}" if r.get("node") else ""),
                     "yes" if r.get("reused") else "", "yes" if r["job"] in on_front else ""])
    return _table(["job", "model", "target", "grid", "status", *LATENCY, "seq/s", "fidelity", "ONNX MB",
                   "load at bench", "job s", "host / node", "reused", "Pareto"], rows, "jobs")


def _validation_table(records: list[dict[str, Any]]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    names = list(dict.fromkeys(k for r in ok for k in (r.get("validation") or {})))
    rows = []
    for r in ok:
        v, t = r.get("validation") or {}, r.get("thresholds") or {}
        rows.append([r["job"], *(f"{v[k]:.4f}" + (f" ({'<=' if k.startswith('max_') else '>='} {t[k]})"
                                                  if k in t else "") if k in v else "" for k in names)])
    return _table(["job", *names], rows)


def _passes_table(records: list[dict[str, Any]]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    names = list(dict.fromkeys(s["name"] for r in ok for s in r.get("passes", [])))
    rows = []
    for r in ok:
        by = {s["name"]: s for s in r.get("passes", [])}
        rows.append([r["job"], r.get("pipeline", ""), *(
            (_num(by[n].get("seconds"), 2) + (" (cached)" if by[n].get("cached") else "")) if n in by else ""
            for n in names), _num(r.get("size", {}).get("source_bytes", 0) / 1e6, 2),
            _num(r.get("size", {}).get("onnx_bytes", 0) / 1e6, 2)])
    return _table(["job", "recipe", *(f"{n} s" for n in names), "PyTorch MB", "ONNX MB"], rows)


def _machines_table(records: list[dict[str, Any]]) -> str:
    seen: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("machine"):
            seen.setdefault((r.get("host"), r.get("node")), r["machine"])
    rows = [[host or "", (node or "")[:12], m.get("cpu"), " ".join(m.get("cpu_flags", [])), m.get("cores"),
             m.get("python"), m.get("onnxruntime"),
             ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())] for (host, node), m in seen.items()]
    return _table(["host", "node", "CPU", "integer-kernel flags", "cores", "python", "onnxruntime", "packages"], rows)


def _isolation(records: list[dict[str, Any]]) -> str:
    modes: dict[str, tuple[str, int]] = {}
    for r in records:
        iso = r.get("bench_isolation")
        if iso:
            how, n = modes.get(iso["mode"], (iso.get("how", ""), 0))
            modes[iso["mode"]] = (how, n + 1)
    items = "".join(f"<li><b>{html.escape(mode)}</b> ({n} job{'s' * (n != 1)}): {html.escape(how)}</li>"
                    for mode, (how, n) in modes.items())
    return f"<ul>{items}</ul>" if items else "<p>No timed job.</p>"


STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0 1.5em;"
         "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}th{background:#f2f2f2}"
         "svg{max-width:100%;height:auto}.jobs td:nth-child(n+6){text-align:right}")


def render(records: list[dict[str, Any]], svg: str, sources: list[str]) -> str:
    groups = panels(records)
    on_front = {p.job for _, _, points, _ in groups for p in points if p.on_front}
    metric_of = {p.job: metric for _, metric, points, _ in groups for p in points}
    failed = [r for r in records if r.get("status") != "ok"]
    data = {"points": [{"job": p.job, "model": model, "target": p.label, "p50_ms": p.latency_ms, "metric": metric,
                        "fidelity": p.fidelity, "pareto": p.on_front} for model, metric, points, _ in groups
                       for p in points]}
    summary = (f"{len(records)} jobs: {len(records) - len(failed)} ok, {len(failed)} failed, "
               f"{sum(1 for r in records if r.get('reused'))} reused from an earlier run")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>optpipe sweep report</title>",
        f"<style>{STYLE}</style></head><body><h1>optpipe sweep report</h1>",
        f"<p>{html.escape(summary)}. Made {_dt.datetime.now().isoformat(timespec='seconds')} from "
        f"{html.escape(', '.join(sources))}.</p>",
        "<h2>How latency was measured</h2>", _isolation(records),
        "<p>Latency is the p50 of the first shape in each target's harness table (default batch 1, 128 tokens). "
        "Points of one model are only comparable when they were timed on the same kind of machine (see Machines).</p>",
        "<h2>Latency vs fidelity, size, seconds per pass</h2>", svg,
        "<h2>Jobs</h2>", _jobs_table(records, on_front, metric_of),
        "<h2>Validation metrics</h2><p>Against the original PyTorch model; thresholds in brackets.</p>",
        _validation_table(records),
        "<h2>Seconds per pass and size</h2>", _passes_table(records),
    ]
    if failed:
        parts += ["<h2>Failed jobs</h2>", _table(["job", "phase", "error", "host"], [
            [r["job"], r.get("phase", ""), r.get("error", ""), r.get("host", "")] for r in failed])]
    parts += ["<h2>Machines</h2>", _machines_table(records),
              '<script type="application/json" id="optpipe-report-data">'
              + json.dumps(data).replace("</", "<\\/") + "</script></body></html>\n"]
    return "\n".join(parts)


def write_report(paths: list[str | Path] | str | Path, out_html: str | Path) -> Path:
    """Write out_html (self-contained: inline SVG, no scripts or fonts fetched) and a PNG of the same figure beside
    it (report.html -> report.png); returns the HTML path."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records = collect(list(paths))
    if not records:
        raise ArtifactError(f"nothing to report: {', '.join(map(str, paths))} hold no job records")
    ok = [r for r in records if r.get("status") == "ok"]
    fig = draw(panels(records), ok)
    out_html = Path(out_html).expanduser()
    png = out_html.with_suffix(".png")
    try:
        out_html.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(to_png(fig))
        out_html.write_text(render(records, to_svg(fig), [str(p) for p in paths]))
    except OSError as exc:
        raise OutputError(f"cannot write the report: {exc.strerror or exc}") from None
    return out_html
