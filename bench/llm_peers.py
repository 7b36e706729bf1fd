"""SmolLM2-135M: optpipe's decoder artifacts against onnxruntime-genai's model builder and llama.cpp, in one process.

Every arm decodes the same prompt (~120 tokens, the one in decoder_graph_speed.py) then N new tokens greedily, 2
threads, spinning off where the runtime allows it (`--spinning parked`: ORT and GenAI threads spin during each run and
sleep when it returns), the arms interleaved in a freshly shuffled order each round.
Arms:

- `--ort LABEL=DIR`: the ONNX graph in DIR (model.onnx) through plain onnxruntime sessions and a numpy greedy loop
  (the same loop for optpipe's graphs and the GenAI builder's: it compares the graphs, not the runtimes);
- `--genai LABEL=DIR`: DIR through onnxruntime-genai's own runtime (og.Model/og.Generator, its preallocated KV
  buffer), for any directory holding a genai_config.json (optpipe's artifacts carry one);
- `--llama-cpp LABEL=GGUF`: llama.cpp through llama-cpp-python's C API on the same token ids.

Fidelity, for every ONNX graph and llama.cpp, by one code path: teacher-forced next-token (top-1) agreement and the
perplexity ratio against PyTorch float32 (`--reference`, the GGUF dequantized by transformers) on optpipe's
validation texts, one text at a time (truncated to 64 tokens, as optpipe's validation does).

    python bench/llm_peers.py --reference /tmp/smol-hf --ort optpipe-int8=/tmp/bench-smol/cpu-int8 \\
        --ort genai-int8=/tmp/bench-smol/genai/int8 --genai optpipe-int8=/tmp/bench-smol/cpu-int8 \\
        --llama-cpp llama.cpp-Q4_1=SmolLM2-135M-Instruct.Q4_1.gguf --ratio optpipe-int8/genai-int8 --rounds 7

Speed ratios are paired per round (tok/s of A over B; > 1: A is faster) with the 95% moving-block-bootstrap
interval of optpipe.perf.stats; wall clock and process CPU time per token are both reported, the latter survives
other jobs on a shared machine better (not entirely: caches and memory bandwidth are shared too).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# llama.cpp's OpenMP workers spin after each call by default; in one process that steals the next arm's cores.
# Passive waiting is llama.cpp's counterpart of ONNX Runtime's allow_spinning=0 (read when libgomp loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).parent))
from decoder_graph_speed import PROMPT, cpu_facts, generate, session  # noqa: E402

THREADS = 2
MAX_LENGTH = 64  # optpipe.validation.generation.MAX_LENGTH


class OrtArm:
    """A decoder graph through a plain onnxruntime session (inputs input_ids, attention_mask, past_key_values.*)."""

    def __init__(self, path: Path, config, spinning: str):
        self.path, self.config = path, config
        self.sess = session(path / "model.onnx", spinning)

    def generate(self, ids: list[int], new: int):
        tokens, prefill, wall, cpu = generate(self.sess, self.config, np.array([ids], np.int64), new)
        return tokens, prefill, wall, cpu

    def logits(self, ids: list[int]) -> np.ndarray:
        from decoder_graph_speed import feeds

        arr = np.array([ids], np.int64)
        return self.sess.run(["logits"], feeds(self.sess, self.config, arr, np.ones_like(arr), None))[0][0]

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.name.startswith("model.onnx")
                   or p.suffix in (".onnx", ".data"))


class GenaiArm:
    """onnxruntime-genai's runtime on a directory with genai_config.json, threads and spinning set by overlay."""

    def __init__(self, path: Path, spinning: str):
        import onnxruntime_genai as og

        self.og, self.path = og, path
        config = og.Config(str(path))
        from optpipe.session import spinning_entries

        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": THREADS, "inter_op_num_threads": 1, **spinning_entries(spinning)}}}}))
        self.model = og.Model(config)

    def generate(self, ids: list[int], new: int):
        og = self.og
        params = og.GeneratorParams(self.model)
        length = len(ids) + new + 2
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array([ids], np.int32))  # runs the prompt
        gen.generate_next_token()  # picks token 1 from the prompt's logits
        tokens = [int(gen.get_next_tokens()[0])]
        prefill = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(new):  # each: one single-token forward, then the pick
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        return tokens[:new], prefill, time.perf_counter() - t0, time.process_time() - c0

    def size(self) -> int:
        return OrtArm.size(self)


class LlamaCppArm:
    """llama.cpp through llama-cpp-python's low-level API: the same token ids, greedy argmax in numpy."""

    def __init__(self, gguf: Path, extra_bufts: bool):
        import llama_cpp as lc

        self.lc, self.path = lc, gguf
        self._quiet = lc.llama_log_callback(lambda level, text, user: None)  # kept: ctypes must not free it
        lc.llama_log_set(self._quiet, ctypes.c_void_p(0))
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        # Extra buffer types (the AMX / repacked weight layouts) crash in llama_decode on this machine (segfault with
        # llama-cpp-python 0.3.36 on a Sapphire-Rapids-class Xeon); off by default, --llama-cpp-extra-bufts to retry.
        mp.use_extra_bufts = extra_bufts
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mp)
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, 512, 512
        cp.n_threads = cp.n_threads_batch = THREADS
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def _clear(self):
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def _decode(self, ids: list[int]):
        arr = (self.lc.llama_token * len(ids))(*ids)
        rc = self.lc.llama_decode(self.ctx, self.lc.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def generate(self, ids: list[int], new: int):
        self._clear()
        t0 = time.perf_counter()
        self._decode(ids)
        prefill = time.perf_counter() - t0
        tokens = []
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(new):
            tokens.append(int(self._last_logits().argmax()))
            self._decode([tokens[-1]])
        return tokens, prefill, time.perf_counter() - t0, time.process_time() - c0

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of `ids` (teacher forcing), from a fresh KV cache."""
        lc = self.lc
        self._clear()
        batch = lc.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                batch.seq_id[i][0] = 0
            if lc.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            return np.stack([np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                             for i in range(len(ids))])
        finally:
            lc.llama_batch_free(batch)

    def size(self) -> int:
        return self.path.stat().st_size


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(-1))
    return float((log_z - x[np.arange(len(labels)), labels]).sum())


def fidelity(reference: Path, tokenizer_dir: Path, arms: dict, texts: list[str]) -> dict[str, dict[str, float]]:
    """Teacher-forced top-1 agreement (every position) and perplexity ratio (positions with a next token) per arm."""
    import torch
    from transformers import AutoModelForCausalLM

    from optpipe.source import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    encoded = [tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in texts]
    refs = []
    with torch.no_grad():
        for ids in encoded:
            refs.append(model(torch.tensor([ids])).logits[0].numpy())
    nll_ref = sum(_nll(r[:-1], np.array(ids[1:], np.int64)) for r, ids in zip(refs, encoded))
    scored = sum(len(ids) - 1 for ids in encoded)
    out = {}
    for name, arm in arms.items():
        agree = total = 0
        nll = 0.0
        max_diff = 0.0
        for ids, ref in zip(encoded, refs):
            logits = arm.logits(ids)
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
            nll += _nll(logits[:-1], np.array(ids[1:], np.int64))
            max_diff = max(max_diff, float(np.abs(logits - ref).max()))
        out[name] = {"next_token_agreement": agree / total, "perplexity_ratio": float(np.exp((nll - nll_ref) / scored)),
                     "max_abs_diff": max_diff, "positions": total}
    out["_reference"] = {"perplexity": float(np.exp(nll_ref / scored)), "texts": len(texts), "positions": scored}
    return out


def _pairs(values: list[str]) -> dict[str, Path]:
    out = {}
    for v in values or []:
        label, _, path = v.partition("=")
        out[label] = Path(path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="HF dir of the float model (PyTorch reference)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir for the prompt and the texts (default: "
                        "--reference; an optpipe artifact from the GGUF has the GGUF's own: no BOS)")
    parser.add_argument("--ort", action="append", metavar="LABEL=DIR", help="decoder graph, plain onnxruntime loop")
    parser.add_argument("--genai", action="append", metavar="LABEL=DIR", help="directory run by onnxruntime-genai")
    parser.add_argument("--llama-cpp", action="append", metavar="LABEL=GGUF")
    parser.add_argument("--llama-cpp-extra-bufts", action="store_true", help="let llama.cpp repack weights (AMX)")
    parser.add_argument("--ratio", action="append", default=[], metavar="A/B", help="paired speed ratio to report")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--spinning", choices=("off", "parked"), default="off",
                        help="ONNX Runtime's idle threads (ORT and GenAI arms): off = sleep at once; parked = spin "
                        "during each run and sleep when it returns (optpipe/session.py SPINNING)")
    args = parser.parse_args()
    import onnxruntime
    import transformers
    from transformers import AutoConfig

    from optpipe.data.texts import validation_texts
    from optpipe.perf.stats import paired_ratio
    from optpipe.source import load_tokenizer

    config = AutoConfig.from_pretrained(args.reference)
    tokenizer_dir = args.tokenizer or args.reference
    prompt = load_tokenizer(tokenizer_dir)(PROMPT)["input_ids"]
    arms: dict = {}
    kinds: dict[str, str] = {}
    for label, path in _pairs(args.ort).items():
        arms[f"{label} [ort]"], kinds[f"{label} [ort]"] = OrtArm(path, config, args.spinning), "ort"
    for label, path in _pairs(args.genai).items():
        arms[f"{label} [genai-rt]"], kinds[f"{label} [genai-rt]"] = GenaiArm(path, args.spinning), "genai"
    for label, path in _pairs(args.llama_cpp).items():
        name = f"{label} [llama.cpp]"
        arms[name], kinds[name] = LlamaCppArm(path, args.llama_cpp_extra_bufts), "lc"
    versions = [f"onnxruntime {onnxruntime.__version__}", f"transformers {transformers.__version__}",
                f"python {platform.python_version()}"]
    for mod in ("onnxruntime_genai", "llama_cpp"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    lines = [f"command: python {' '.join(sys.argv)}", *cpu_facts(), ", ".join(versions),
             f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens greedy, {THREADS} threads, "
             f"spinning {args.spinning} "
             f"(ORT and GenAI session option; llama.cpp: OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
             f"{args.rounds} rounds in shuffled "
             "order"]
    fid = {}
    if not args.no_fidelity:
        with_logits = {n: a for n, a in arms.items() if hasattr(a, "logits")}
        fid = fidelity(args.reference, tokenizer_dir, with_logits, list(validation_texts()))
        ref = fid["_reference"]
        lines.append(f"fidelity vs PyTorch fp32 ({args.reference}, tokenizer {tokenizer_dir}): {ref['texts']} "
                     f"validation texts, {ref['positions']} "
                     f"scored positions, reference perplexity {ref['perplexity']:.3f}")
    for arm in arms.values():  # warm-up: first runs allocate and prepack
        arm.generate(prompt, 4)
    load_before = os.getloadavg()
    wall = {n: [] for n in arms}
    cpu = {n: [] for n in arms}
    ttft = {n: [] for n in arms}
    tokens = {}
    order = list(arms)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            tokens[name], pre, w, c = arms[name].generate(prompt, args.new_tokens)
            wall[name].append(w)
            cpu[name].append(c)
            ttft[name].append(pre)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {args.new_tokens / wall[n][-1]:.1f}" for n in arms),
              flush=True)
    load_after = os.getloadavg()
    lines.append(f"load average (1/5/15 min) before timing {load_before[0]:.2f}/{load_before[1]:.2f}/"
                 f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} "
                 f"on {os.cpu_count()} CPUs")
    lines.append("")
    header = (f"{'arm':<34} {'tok/s wall':>10} {'[min, max]':>14} {'CPU ms/tok':>10} {'TTFT ms':>8} "
              f"{'agreement':>9} {'ppl ratio':>9} {'size MB':>8}")
    lines += [header, "-" * len(header)]
    n = args.new_tokens
    for name, arm in arms.items():
        tps = [n / w for w in wall[name]]
        f = fid.get(name) or fid.get(name.replace("[genai-rt]", "[ort]")) or {}
        agree = f"{f['next_token_agreement']:.4f}" if f else "-"
        ppl = f"x{f['perplexity_ratio']:.4f}" if f else "-"
        lines.append(f"{name:<34} {statistics.median(tps):10.1f} [{min(tps):5.1f}, {max(tps):5.1f}] "
                     f"{1e3 * statistics.median(cpu[name]) / n:10.2f} {1e3 * statistics.median(ttft[name]):8.0f} "
                     f"{agree:>9} {ppl:>9} {arm.size() / 1e6:8.1f}")
    lines.append("(genai-rt rows reuse the agreement of the same graph measured through plain onnxruntime)")
    lines.append("")
    ratios = {}
    for spec in args.ratio:
        a, b = spec.split("/")
        a = next(k for k in arms if k.split(" [")[0] == a or k == a)
        b = next(k for k in arms if k.split(" [")[0] == b or k == b)
        w_est = paired_ratio(np.array(wall[a]), np.array(wall[b]))  # wall_b / wall_a = tok/s_a / tok/s_b
        c_est = paired_ratio(np.array(cpu[a]), np.array(cpu[b]))
        ratios[f"{a} / {b}"] = {"wall": [w_est.ratio, w_est.low, w_est.high],
                                "cpu": [c_est.ratio, c_est.low, c_est.high]}
        lines.append(f"speed {a} / {b}: wall {w_est.ratio:.3f} [{w_est.low:.3f}, {w_est.high:.3f}], "
                     f"CPU time {c_est.ratio:.3f} [{c_est.low:.3f}, {c_est.high:.3f}] ({args.rounds} paired rounds)")
    first = {n: t[:12] for n, t in tokens.items()}
    lines.append("first 12 greedy tokens: " + "; ".join(f"{n}: {t}" for n, t in first.items()))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"lines": lines, "fidelity": fid, "ratios": ratios, "kinds": kinds,
                                         "wall_s": wall, "cpu_s": cpu, "ttft_s": ttft, "tokens": tokens,
                                         "sizes": {k: a.size() for k, a in arms.items()}}, indent=1))


if __name__ == "__main__":
    main()
