"""SmolLM2-135M through optpipe's cpu-fp32 / cpu-int8 / cpu-int4: decode tok/s, time to first token, fidelity
(from each artifact's validation) and size, decode measured interleaved in one process (A B C A B C …).

    python bench/llm_targets.py ART_DIR [ART_DIR ...] --rounds 5 --out bench/results/llm_targets.txt

Artifacts come from `optpipe run SmolLM2-135M-Instruct.Q4_1.gguf --target cpu-int4 -o …` and the like. Process
CPU time per token is reported beside wall clock: on a shared 2-core machine it is the figure that survives
other jobs (it counts both intra-op threads, spinning off).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decoder_graph_speed import cpu_facts, generate, session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoConfig

    from optpipe.source import load_tokenizer

    first = args.artifacts[0]
    config = AutoConfig.from_pretrained(first)
    prompt = " ".join(Path(__file__).parents[1].joinpath("optpipe/data/validation.txt").read_text().split()[:90])
    ids = np.array([load_tokenizer(first)(prompt)["input_ids"]], dtype=np.int64)
    sessions = {a.name: session(a / "model.onnx") for a in args.artifacts}
    wall = {n: [] for n in sessions}
    cpu = {n: [] for n in sessions}
    ttft = {n: [] for n in sessions}
    for _ in range(args.rounds):
        for name, sess in sessions.items():
            _, prefill, w, c = generate(sess, config, ids, args.new_tokens)
            wall[name].append(args.new_tokens / w)
            cpu[name].append(c / args.new_tokens * 1e3)
            ttft[name].append(prefill * 1e3)
    lines = [f"command: python bench/llm_targets.py {' '.join(map(str, args.artifacts))} --rounds {args.rounds}",
             *cpu_facts(), f"prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens greedy, 2 intra-op threads, "
             f"{args.rounds} interleaved rounds (median)"]
    base = next(iter(sessions))
    for name in sessions:
        m = json.loads((Path([a for a in args.artifacts if a.name == name][0]) / "manifest.json").read_text())
        v = m["validation"]["metrics"]
        ratio = np.median(np.array(cpu[base]) / np.array(cpu[name]))
        lines.append(f"  {name:<14} decode {np.median(wall[name]):6.1f} tok/s wall, {np.median(cpu[name]):6.1f} ms CPU/token "
                     f"(x{ratio:.2f} vs {base} by CPU time), TTFT {np.median(ttft[name]):6.0f} ms, "
                     f"agreement {v.get('next_token_agreement', 0):.4f}, perplexity x{v.get('perplexity_ratio', 0):.4f}, "
                     f"{m['size']['onnx_bytes'] / 1e6:.0f} MB")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
