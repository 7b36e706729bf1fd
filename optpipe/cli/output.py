"""What the command line prints: progress lines on stderr, the run summary on stdout."""

from __future__ import annotations

import sys
from typing import Any

from optpipe.validation.validate import is_ceiling


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _brief(report: dict[str, Any]) -> str:
    """One line of what a pass changed, from its report."""
    parts = []
    for name, comp in report.get("components", {}).items() if isinstance(report.get("components"), dict) else []:
        if comp.get("fused"):
            split = comp.get("split_skip_layernorm")
            parts.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in comp["fused"].items())
                         + (f" (split into Sum + LayerNormalization: {split})" if split else ""))
        elif comp.get("integer_ops"):
            kept = len(comp.get("kept_float", {}))
            outliers = sum(len(v["channels"]) for v in (comp.get("outlier_channels") or {}).values())
            parts.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in comp["integer_ops"].items())
                         + (f"; {outliers} FFN outlier channels in float" if outliers else "")
                         + (f"; {kept} kept float" if kept else ""))
        elif "quantized" in comp:  # weight_only
            bits = ", ".join(f"{n} to {b}-bit" for b, n in comp["quantized"].items()) or "nothing quantized"
            sensitive = comp.get("kept_by_sensitivity")
            parts.append(f"{name}: {bits}" + (f", {comp['carried']} carried over" if comp.get("carried") else "")
                         + (f"; kept float by sensitivity: {', '.join(sensitive)}" if sensitive else ""))
    if not parts and "components" in report and isinstance(report["components"], list):
        parts.append(", ".join(report["components"]))
    for key in ("note", "sparsity", "chosen"):
        if key in report:
            parts.append(f"{key}: {report[key]}")
    return "; ".join(parts)


def print_summary(artifact) -> None:
    m = artifact.manifest
    print(f"{m['source']['id']} -> {m['target']['name']}   [{m['pipeline']}]")
    print(f"{'pass':<10} {'seconds':>8} {'size in':>10} {'size out':>10}  what changed")
    for step in m["passes"]:
        seconds = "cached" if step["cached"] else f"{step['seconds']:.1f}"
        print(f"{step['name']:<10} {seconds:>8} {mb(step['bytes_in']):>10} {mb(step['bytes_out']):>10}  "
              f"{_brief(step['report'])}")
    v = m["validation"]
    figures = ", ".join(f"{k} {val:.4f}" for k, val in v["metrics"].items())
    limits = ", ".join(f"{k} {'<=' if is_ceiling(k) else '>='} {val}" for k, val in v["thresholds"].items())
    status = f"deferred ({v['deferred']})" if v.get("deferred") else ("passed" if v["passed"] else "FAILED")
    print(f"validation ({v['texts']} texts, {v['provider']}): {figures}  [{limits}]  {status}")
    cpu = v.get("cpu")
    integer = any(g.get("integer_ops") or "MatMulNBits" in g.get("ops", {}) for g in m.get("graph", {}).values())
    if cpu and cpu.get("target_isa") and integer:  # CPU targets: which integer numerics were checked, on what
        print(f"isa: INT8 numerics for {cpu['target_isa']}, validated on {cpu['family']} ({cpu['brand']})"
              + (f"; {cpu['note']}" if cpu.get("note") else ""))
    elif cpu and cpu.get("target_isa"):
        print(f"isa: no integer kernels (float only), validated on {cpu['family']} "
              f"({cpu['brand']})")
    for workload, prof in m.get("profile", {}).get("workloads", {}).items():
        top = ", ".join(f"{op} {v['share']:.0%}" for op, v in list(prof["ops"].items())[:4])
        print(f"time by op type ({workload}, bs {m['profile']['settings']['batch']} seq "
              f"{m['profile']['settings']['seq']}, {prof['ms_per_run']:.2f} ms a run): {top}")
    print(f"size: {mb(m['size']['source_bytes'])} (PyTorch weights) -> {mb(m['size']['onnx_bytes'])} (ONNX)")
    for row in m.get("bench", {}).get("rows", []):
        print(f"bench ({row['providers'][0]}, {row['workload']} bs {row['batch']} seq {row['seq']}): p50 "
              f"{row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms, {row['sequences_per_s']:.1f} seq/s")
    if m.get("bench", {}).get("skipped"):
        print(f"bench skipped: {m['bench']['skipped']}")
    print(f"artifact: {artifact.path}")
