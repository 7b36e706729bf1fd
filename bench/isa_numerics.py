"""Re-validate published artifacts on this CPU, to see an artifact's INT8 numerics under another ISA.

    python bench/isa_numerics.py ART_DIR... [--x64quantprecision] [--json FILE]

It runs the same validation as `optpipe run` (the artifact against its PyTorch source, the target's thresholds)
and prints one JSON line per artifact, with what ONNX Runtime's u8 x s8 kernel does on this CPU, probed: a
MatMulInteger of 255 x 127 products reads 2 x 32767 per pair when the kernel saturates (AVX2 without VNNI).

AVX2 kernels on a CPU with VNNI/AMX: ONNX Runtime picks kernels from CPUID and has no switch to restrict them, but
under QEMU's user-mode emulator the guest CPUID is the emulated model's, so the real AVX2 kernels run (slowly):

    OPTPIPE_CPU_FLAGS="avx2 fma" qemu-x86_64 -cpu EPYC-Rome .venv/bin/python bench/isa_numerics.py ART_DIR...

(OPTPIPE_CPU_FLAGS, because py-cpuinfo reads the host's /proc/cpuinfo under qemu-user.) Timing means nothing
there; the figures do. PyTorch under emulation is slow (over 10 minutes for MiniLM's reference on a loaded
machine), so feature-extraction artifacts can be split: `--save-outputs FILE.npz` runs only the ONNX sessions (under
qemu), and `--reference FILE.npz` (natively) computes the PyTorch reference and the validation's metrics from them;
`--texts heldout` uses the held-out texts instead of the validation ones, and `--diff OTHER.npz` with --reference adds
the largest difference from the same artifacts' outputs saved elsewhere (natively, say).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optpipe.perf.isa import X64_QUANT_PRECISION, detect  # noqa: E402


def u8s8_kernel() -> str:
    """'saturating' or 'exact': what ONNX Runtime's u8 x s8 GEMM does on this CPU, measured."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
                              [numpy_helper.from_array(np.full((k, 1), 127, np.int8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = int(session.run(None, {"a": np.full((1, k), 255, np.uint8)})[0][0, 0])
    return "exact" if y == 255 * 127 * k else "saturating" if y == 32767 * k // 2 else f"unexpected {y}"


def revalidate(path: Path, x64quantprecision: bool) -> dict:
    from optpipe import Artifact
    from optpipe.passbase import ModelFiles
    from optpipe.source import resolve_source
    from optpipe.validation.validate import validate

    art = Artifact.load(path)
    src = art.manifest["source"]
    source = resolve_source(src["path"], src["task"])
    target = art.target.for_task(source.task)
    if x64quantprecision:
        target = replace(target, session_options={**target.session_options, X64_QUANT_PRECISION: "1"})
    start = time.perf_counter()
    result = validate(source, ModelFiles(art.path, "onnx", tuple(art.manifest["components"])), target)
    return {"artifact": path.name, "target_isa": art.manifest["target"].get("isa"), "metrics": result.metrics,
            "thresholds": result.thresholds, "passed": result.passed, "failures": list(result.failures),
            "x64quantprecision": x64quantprecision, "seconds": round(time.perf_counter() - start, 1),
            "validated_at_build": art.metrics}


def _encoded(path: Path, texts_name: str = "validation"):
    from optpipe import Artifact
    from optpipe.data.texts import heldout_texts, validation_texts
    from optpipe.source import load_tokenizer
    from optpipe.validation.encoders import BATCH, MAX_LENGTH

    art = Artifact.load(path)
    if art.manifest["source"]["task"] != "feature-extraction":
        raise SystemExit(f"{path}: --save-outputs/--reference are for feature-extraction artifacts")
    tokenizer = load_tokenizer(art.manifest["source"]["path"])
    texts = list(heldout_texts() if texts_name == "heldout" else validation_texts())
    for start in range(0, len(texts), BATCH):
        yield art, tokenizer(list(texts[start:start + BATCH]), padding=True, truncation=True, max_length=MAX_LENGTH,
                             return_tensors="np")


def save_outputs(paths: list[Path], out: Path, x64quantprecision: bool, texts: str = "validation") -> None:
    """The ONNX outputs of each artifact on the validation texts (what validation would compare), only."""
    import numpy as np

    from optpipe.session import target_session

    arrays = {}
    for path in paths:
        for i, (art, enc) in enumerate(_encoded(path, texts)):
            target = art.target
            if x64quantprecision:
                target = replace(target, session_options={**target.session_options, X64_QUANT_PRECISION: "1"})
            if i == 0:
                session = target_session(art.components[0], target, artifact_dir=art.path)
            names = {x.name for x in session.get_inputs()}
            feed = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
            if "token_type_ids" in names and "token_type_ids" not in feed:
                feed["token_type_ids"] = np.zeros_like(enc["input_ids"], dtype=np.int64)
            arrays[f"{path.name}/{i}"] = session.run(None, feed)[0]
    np.savez(out, **arrays)


def from_reference(paths: list[Path], saved: Path, against: str | None = None, gate: str | None = None,
                   texts: str = "validation", other: Path | None = None) -> list[dict]:
    """The validation's feature-extraction metrics of saved ONNX outputs against PyTorch, computed here (against
    another model dir than the artifact's source, e.g. the unpruned model; thresholds of another target)."""
    import numpy as np
    import torch
    from transformers import AutoModel

    from optpipe.targets import load_target

    outputs = np.load(saved)
    others = np.load(other) if other else None
    rows = []
    for path in paths:
        cosines, model, diff = [], None, 0.0
        for i, (art, enc) in enumerate(_encoded(path, texts)):
            model = model or AutoModel.from_pretrained(against or art.manifest["source"]["path"]).eval()
            with torch.no_grad():
                ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
            out = outputs[f"{path.name}/{i}"]
            if others is not None:  # the same artifact's outputs from another run (another ISA)
                diff = max(diff, float(np.abs(out - others[f"{path.name}/{i}"]).max()))
            mask = enc["attention_mask"][..., None].astype(np.float32)
            a, b = (ref * mask).sum(1) / mask.sum(1), (out * mask).sum(1) / mask.sum(1)
            cosines += ((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).tolist()
        thresholds = load_target(gate).validate if gate else art.manifest["validation"]["thresholds"]
        metrics = {"mean_cosine": round(float(np.mean(cosines)), 6), "min_cosine": round(float(np.min(cosines)), 6)}
        rows.append({"artifact": path.name, "outputs": str(saved), "texts": texts, "against": against or "source",
                     **({"max_abs_diff_vs": [str(other), diff]} if other else {}),
                     "metrics": metrics, "thresholds": {k: v for k, v in thresholds.items() if k in metrics},
                     "passed": all(metrics[k] >= v for k, v in thresholds.items() if k in metrics),
                     "validated_at_build": art.metrics})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--x64quantprecision", action="store_true", help=f"set {X64_QUANT_PRECISION}=1")
    parser.add_argument("--json", type=Path, help="append the lines to FILE")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--save-outputs", type=Path, metavar="NPZ", help="only run the ONNX sessions, save outputs")
    split.add_argument("--reference", type=Path, metavar="NPZ", help="metrics of saved outputs against PyTorch")
    parser.add_argument("--against", help="with --reference: the PyTorch model dir to compare with (default: source)")
    parser.add_argument("--gate", help="with --reference: take the thresholds of this target")
    parser.add_argument("--texts", choices=("validation", "heldout"), default="validation",
                        help="with --save-outputs/--reference: the validation texts (default) or the held-out ones")
    parser.add_argument("--diff", type=Path, metavar="NPZ", help="with --reference: max abs difference of the saved "
                        "outputs from these (the same artifacts run elsewhere)")
    args = parser.parse_args()
    cpu = detect()
    kernel = u8s8_kernel()
    print(json.dumps({"family": cpu.family, "flags_from": cpu.flags_from, "u8s8_kernel": kernel}), flush=True)
    if args.save_outputs:
        save_outputs(args.artifacts, args.save_outputs, args.x64quantprecision, args.texts)
        print(f"wrote {args.save_outputs}")
        return 0
    rows = (from_reference(args.artifacts, args.reference, args.against, args.gate, args.texts, args.diff)
            if args.reference else
            [{"u8s8_kernel": kernel, **revalidate(path, args.x64quantprecision)} for path in args.artifacts])
    for row in rows:
        line = json.dumps(row)
        print(line, flush=True)
        if args.json:
            with args.json.open("a") as fh:
                fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
