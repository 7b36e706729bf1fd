"""The headline scoreboard on the bundled all-MiniLM-L6-v2: optpipe's CPU targets beside Optimum's recipes.

Built in the same run: optpipe cpu-fp32 (the reference), the plain fp32 ONNX export (optpipe's export pass
alone = optimum-onnx's main_export), Optimum's ORTOptimizer O2, Optimum's ORTQuantizer dynamic INT8 with both of
its x86 configs (`avx2`: 7-bit weights; `avx512_vnni`: 8-bit), Optimum's quantizer on its own O2 output
(attempted; the failure is recorded), optpipe's cpu-int8 as it was before issue 12 (FFN down-projections float,
SkipLayerNormalization kept), and optpipe's CPU INT8 targets (cpu-int8-pruned from `--pruned DIR`, since it
takes minutes to build). Every model is timed interleaved with the others in one process, ONNX Runtime's thread
spinning off (the harness default; `--spinning off,parked` adds columns timed with threads that spin during each run
and sleep when it returns, as a deployed session's do: optpipe/session.py SPINNING): the speed-up is optpipe
cpu-fp32's latency / the model's, with a 95% interval. Fidelity is the cosine of mean-pooled embeddings vs
PyTorch on the held-out texts (optpipe/data/heldout.txt: not used for calibration, validation or training),
min / mean. Shapes "1xreal" / "8xreal" time held-out sentences at their own token
lengths (padded to the batch's longest).

    python bench/scoreboard.py --threads 2 --seconds 60 --shapes 1x128,8x128,1xreal,8xreal --pruned DIR
    python bench/scoreboard.py --threads 2 --seconds 45 --shapes 1x128,8x128 --spinning off,parked --pruned DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from optpipe import OptpipeError, optimize
from optpipe.perf.harness import interleaved_ratios, machine_facts
from optpipe.source import bundled_model_dir
from optpipe.data.texts import heldout_texts
from optpipe.perf.inputs import seq_name, seq_value

OPTPIPE_TARGETS = ("cpu-int8", "cpu-int8-static")
# cpu-int8 as it was before issue 12: the FFN down-projections in float, ORT's SkipLayerNormalization kernel
BEFORE = ("fuse.split_skip_layernorm=false", "quantize.outlier_channels=0", "quantize.keep_float=[ffn_output]")


def quantization_configs():
    """Optimum's dynamic INT8 configs for x86: avx2 (reduce_range, 7-bit weights) and avx512_vnni (8-bit)."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    return {"avx2": AutoQuantizationConfig.avx2(is_static=False, per_channel=True),
            "avx512_vnni": AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)}


def build_anchors(export_dir: Path, work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Optimum's O2, dynamic INT8 (both configs), and INT8-of-O2 (expected to fail); model files and failures."""
    from optimum.onnxruntime import ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    models, failures = {}, {}
    o2 = work / "optimum-o2"
    ORTOptimizer.from_pretrained(export_dir).optimize(AutoOptimizationConfig.O2(), save_dir=o2)
    models["Optimum O2"] = next(o2.glob("*optimized*.onnx"))
    for name, qconfig in quantization_configs().items():
        q = work / f"optimum-int8-{name}"
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


def fidelity(model_file: Path) -> dict[str, float]:
    """Cosine of mean-pooled last_hidden_state vs PyTorch on the held-out texts: min and mean."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    texts, cosines = list(heldout_texts()), []
    for start in range(0, len(texts), 8):
        enc = tokenizer(texts[start:start + 8], padding=True, truncation=True, max_length=128, return_tensors="np")
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
        out = session.run(None, {k: v.astype(np.int64) for k, v in enc.items() if k in names})[0]
        mask = enc["attention_mask"][..., None]
        a, b = (ref * mask).sum(1) / mask.sum(1), (out * mask).sum(1) / mask.sum(1)
        cosines += ((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).tolist()
    return {"min": round(float(np.min(cosines)), 5), "mean": round(float(np.mean(cosines)), 5)}


def size_mb(path: Path) -> float:
    files = [path] + list(path.parent.glob(path.name + "*data")) if path.is_file() else list(path.glob("*.onnx*"))
    return sum(f.stat().st_size for f in files) / 1e6


def build(args, work: Path, say) -> tuple[dict[str, Path], dict[str, str]]:
    """Every model of the table, optpipe cpu-fp32 first (the reference); and the ones that failed to build."""
    entries: dict[str, Path] = {}
    failures: dict[str, str] = {}
    entries["optpipe cpu-fp32"] = optimize(None, "cpu-fp32", work / "cpu-fp32", overwrite=True, progress=say).path
    plain = optimize(None, "cpu-fp32", work / "plain-fp32-export", pipeline="export", overwrite=True, progress=say)
    entries["plain fp32 ONNX export"] = plain.path
    anchors, failures = build_anchors(plain.path, work)
    entries.update(anchors)
    recipes = [("optpipe cpu-int8, before issue 12", "cpu-int8", BEFORE)] + [
        (f"optpipe {t}", t, ()) for t in OPTPIPE_TARGETS]
    for name, target, overrides in recipes:
        try:
            entries[name] = optimize(None, target, work / name.replace(" ", "_").replace(",", ""), overwrite=True,
                                     overrides=list(overrides), progress=say).path
        except OptpipeError as exc:  # a target that does not build today is a row saying why, not a crash
            failures[name] = str(exc)[:300]
    if args.pruned:
        entries["optpipe cpu-int8-pruned"] = args.pruned
    return entries, failures


def _shape(text: str) -> tuple[int, int]:
    batch, seq = text.split("x")
    return int(batch), seq_value(seq)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0, help="interleaved timing length per shape")
    parser.add_argument("--shapes", default="1x128,8x128,1xreal,8xreal", help="BATCHxSEQ list (SEQ may be 'real')")
    parser.add_argument("--pruned", type=Path, help="a cpu-int8-pruned artifact of the bundled model to include")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, help="keep the built models here (default: a temp dir)")
    parser.add_argument("--spinning", default="off", help="comma-separated spinning modes to time: off, parked, on "
                        "(default off; a mode other than off adds its own columns)")
    args = parser.parse_args()
    started = dt.datetime.now(dt.timezone.utc)
    work = args.work or Path(tempfile.mkdtemp(prefix="optpipe-scoreboard-"))
    work.mkdir(parents=True, exist_ok=True)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    entries, failures = build(args, work, say)
    files = {name: (p / "model.onnx" if p.is_dir() else p) for name, p in entries.items()}
    rows = {name: {"held_out_cosine": fidelity(f), "size_mb": round(size_mb(f), 1)} for name, f in files.items()}
    shapes = [_shape(s) for s in args.shapes.split(",")]
    modes = args.spinning.split(",")
    cells = [(f"bs{batch}_{seq_name(seq)}" + ("" if mode == "off" else f"_spin_{mode}"), mode, batch, seq)
             for mode in modes for batch, seq in shapes]
    keys = [cell[0] for cell in cells]
    load: dict[str, list[float]] = {}  # 1-minute load average before and after each shape: other work skews ratios
    for key, mode, batch, seq in cells:
        before = os.getloadavg()[0]
        say(f"timing {len(entries)} models interleaved at bs {batch} seq {seq_name(seq)}, spinning {mode}, "
            f"for {args.seconds:g}s ...")
        ratios = interleaved_ratios(list(entries.values()), batch=batch, seq=seq, threads=args.threads,
                                    seconds=args.seconds, spinning=mode)
        for name, r in zip(entries, ratios):  # latency / cpu-fp32's -> speed-up = its inverse
            rows[name][key] = {"speedup": round(1 / r.ratio, 3), "low": round(1 / r.high, 3),
                               "high": round(1 / r.low, 3), "rounds": r.rounds}
        load[key] = [round(before, 2), round(os.getloadavg()[0], 2)]
    report = {"date": started.isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "machine": machine_facts(args.threads), "reference": "optpipe cpu-fp32", "rows": rows,
              "load_average": load, "failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    from optpipe.perf.isa import isa_family

    # one file per CPU family measured (and per set of spinning modes other than the default)
    stem = f"scoreboard-{started.strftime('%Y%m%d')}-{isa_family()}" + "".join(f"-{m}" for m in modes if m != "off")
    tmp = args.out / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out / f"{stem}.json")
    m = report["machine"]
    lines = [f"Bundled all-MiniLM-L6-v2; {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, "
             f"{args.threads} threads, onnxruntime {m['onnxruntime']}, {started:%Y-%m-%d}. Speed-up = optpipe "
             "cpu-fp32 latency / the model's (higher is faster), 95% interval, interleaved in one process; "
             "'real' = held-out sentences at their own token lengths; '_spin_parked' = ONNX Runtime's threads spin "
             "during each run and sleep when it returns (the others: spinning off). Fidelity: cosine vs PyTorch on "
             "96 held-out texts.", "", f"`{report['command']}`", "",
             "| model | " + " | ".join(f"speed-up {k}" for k in keys) + " | held-out cosine min / mean | size MB |",
             "| --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
    for name, row in rows.items():
        cells = [f"{row[k]['speedup']:.2f}x [{row[k]['low']:.2f}, {row[k]['high']:.2f}]" for k in keys]
        fid = row["held_out_cosine"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fid['min']:.4f} / {fid['mean']:.4f} | "
                     f"{row['size_mb']} |")
    for name, why in failures.items():
        lines.append(f"| {name} | " + " | ".join("failed" for _ in keys) + f" | {why} | - |")
    lines += ["", "1-minute load average before / after each shape (2 cores; the timed sessions add about 1): "
              + ", ".join(f"{k} {v[0]} / {v[1]}" for k, v in load.items())]
    tmp = args.out / f".{stem}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out / f"{stem}.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
