"""The headline scoreboard on the bundled all-MiniLM-L6-v2: optpipe's CPU targets against Optimum anchors.

Anchors, built in the same run: the plain fp32 ONNX export (optpipe's export pass alone = optimum-onnx's
main_export), Optimum's ORTOptimizer O2 on it, Optimum's ORTQuantizer dynamic INT8 on it (the
AutoQuantizationConfig that fits this CPU), and Optimum's quantizer on its own O2 output (attempted; the
failure is recorded). Every model is timed interleaved with the others in one process (spinning off), and
each gets its latency ratio to the plain fp32 export with a 95% interval, fidelity (cosine of mean-pooled
embeddings vs PyTorch on optpipe's validation texts) and size.

    python bench/scoreboard.py --threads 2 --seconds 60 --shapes 1x128,8x128
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from optpipe import OptpipeError, optimize
from optpipe.perf.harness import interleaved_ratios, machine_facts
from optpipe.source import bundled_model_dir
from optpipe.data.texts import validation_texts

OPTPIPE_TARGETS = ("cpu-fp32", "cpu-int8", "cpu-int8-static")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def quantization_config():
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "avx512_vnni", AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    if "avx512f" in flags:
        return "avx512", AutoQuantizationConfig.avx512(is_static=False, per_channel=True)
    return "avx2", AutoQuantizationConfig.avx2(is_static=False, per_channel=True)


def build_anchors(export_dir: Path, work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Optimum's O2, dynamic INT8, and INT8-of-O2 (expected to fail); returns model files and failures."""
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    models, failures = {}, {}
    o2 = work / "optimum-o2"
    ORTOptimizer.from_pretrained(export_dir).optimize(AutoOptimizationConfig.O2(), save_dir=o2)
    models["Optimum O2"] = next(o2.glob("*optimized*.onnx"))
    name, qconfig = quantization_config()
    q = work / "optimum-int8"
    ORTQuantizer.from_pretrained(export_dir).quantize(qconfig, save_dir=q)
    models[f"Optimum dynamic INT8 ({name})"] = next(q.glob("*quantized*.onnx"))
    try:
        q2 = work / "optimum-o2-int8"
        ORTQuantizer.from_pretrained(o2, file_name=models["Optimum O2"].name).quantize(qconfig, save_dir=q2)
        models[f"Optimum O2 + dynamic INT8 ({name})"] = next(q2.glob("*quantized*.onnx"))
    except Exception as exc:  # the known failure: the quantizer cannot type the fused contrib ops' outputs
        failures[f"Optimum O2 + dynamic INT8 ({name})"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for path in list(models.values()):
        for item in export_dir.iterdir():  # tokenizer, so the harness times real token ids
            if item.suffix != ".onnx" and not (path.parent / item.name).exists() and item.is_file():
                shutil.copy2(item, path.parent / item.name)
    return models, failures


def fidelity(model_file: Path) -> float:
    """Mean cosine of mean-pooled last_hidden_state vs PyTorch on the validation texts."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    texts, cosines = list(validation_texts()), []
    for start in range(0, len(texts), 8):
        enc = tokenizer(texts[start:start + 8], padding=True, truncation=True, max_length=128, return_tensors="np")
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
        out = session.run(None, {k: v.astype(np.int64) for k, v in enc.items() if k in names})[0]
        mask = enc["attention_mask"][..., None]
        a, b = (ref * mask).sum(1) / mask.sum(1), (out * mask).sum(1) / mask.sum(1)
        cosines += ((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).tolist()
    return float(np.mean(cosines))


def size_mb(path: Path) -> float:
    files = [path] + list(path.parent.glob(path.name + "*data")) if path.is_file() else list(path.glob("*.onnx*"))
    return sum(f.stat().st_size for f in files) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0, help="interleaved timing length per shape")
    parser.add_argument("--shapes", default="1x128,8x128", help="BATCHxSEQ list")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, help="keep the built models here (default: a temp dir)")
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    work = args.work or Path(tempfile.mkdtemp(prefix="optpipe-scoreboard-"))
    work.mkdir(parents=True, exist_ok=True)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    plain = optimize(None, "cpu-fp32", work / "plain-fp32-export", pipeline="export", overwrite=True, progress=say)
    entries: dict[str, Path] = {"plain fp32 ONNX export": plain.path}
    anchors, failures = build_anchors(plain.path, work)
    entries.update(anchors)
    for target in OPTPIPE_TARGETS:
        try:
            entries[f"optpipe {target}"] = optimize(None, target, work / target, overwrite=True, progress=say).path
        except OptpipeError as exc:  # a target that does not build today is a row saying why, not a crash
            failures[f"optpipe {target}"] = str(exc)[:300]
    files = {name: (p / "model.onnx" if p.is_dir() else p) for name, p in entries.items()}
    rows = {name: {"fidelity_mean_cosine": round(fidelity(f), 5), "size_mb": round(size_mb(f), 1)}
            for name, f in files.items()}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for batch, seq in shapes:
        say(f"timing {len(entries)} models interleaved at bs {batch} seq {seq} for {args.seconds:g}s ...")
        ratios = interleaved_ratios(list(entries.values()), batch=batch, seq=seq, threads=args.threads,
                                    seconds=args.seconds)
        for name, r in zip(entries, ratios):
            rows[name][f"bs{batch}_seq{seq}"] = {"ratio": r.ratio, "low": r.low, "high": r.high, "rounds": r.rounds}
    report = {"date": started.isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "machine": machine_facts(args.threads), "reference": "plain fp32 ONNX export",
              "rows": rows, "failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"scoreboard-{started.strftime('%Y%m%d')}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Bundled all-MiniLM-L6-v2, {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{args.threads} threads, {started:%Y-%m-%d}. Latency ratio to the plain fp32 export (lower is "
             "faster), 95% interval, interleaved in one process.", "",
             "| model | " + " | ".join(f"latency ratio bs{b} seq{s}" for b, s in shapes) + " | mean cosine vs PyTorch "
             "| size MB |", "| --- | " + " | ".join("---" for _ in shapes) + " | --- | --- |"]
    for name, row in rows.items():
        cells = [f"{row[f'bs{b}_seq{s}']['ratio']:.3f} [{row[f'bs{b}_seq{s}']['low']:.3f}, "
                 f"{row[f'bs{b}_seq{s}']['high']:.3f}]" for b, s in shapes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['fidelity_mean_cosine']:.4f} | {row['size_mb']} |")
    for name, why in failures.items():
        lines.append(f"| {name} | " + " | ".join("failed" for _ in shapes) + f" | {why} | - |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
