"""Variants of an optpipe artifact with carried GGUF Q4_1 blocks, for bench/llm_peers.py (copies; source untouched).

    python bench/llm_peers_variants.py SRC DST --level 4              # every MatMulNBits at accuracy_level 4
    python bench/llm_peers_variants.py SRC DST --level 0 --head-level 4   # 4-bit body at 0, the 8-bit lm_head at 4
    python bench/llm_peers_variants.py SRC DST --level 4 --center     # zero point 8 instead of 0 (see below)

`--level 4` on the whole graph is what `optpipe run … --set export.accuracy_level=4` writes (that build is refused by
the validation gate, so no artifact comes out of it). `--center` stores each Q4_1 block as d * (q - 8) with the
offset MatMul carrying m + 8 d: the same weights up to float rounding of m + 8 d, but with int8 activations
(accuracy_level 4) the activation rounding error is multiplied by centred weights q - 8 in [-8, 7] instead of q in
[0, 15], and it no longer leaks into the exact per-block activation sums of the offset MatMul unbalanced.
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--level", type=int, required=True, help="accuracy_level of the 4-bit MatMulNBits")
    parser.add_argument("--head-level", type=int, help="accuracy_level of the 8-bit ones (default: --level)")
    parser.add_argument("--center", action="store_true", help="zero point 8, offsets + 8 * scale")
    args = parser.parse_args()
    import onnx
    from onnx import numpy_helper

    if args.dst.exists():
        shutil.rmtree(args.dst)
    shutil.copytree(args.src, args.dst)
    model = onnx.load(str(args.dst / "model.onnx"))
    init = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    levels, centred = Counter(), 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a for a in node.attribute}
        bits = attrs["bits"].i
        level = args.level if bits == 4 or args.head_level is None else args.head_level
        attrs["accuracy_level"].i = level
        levels[(bits, level)] += 1
        if not (args.center and bits == 4 and len(node.input) > 3):
            continue
        add = next(c for c in consumers[node.output[0]] if c.op_type == "Add")
        offsets_mm = producer[next(i for i in add.input if i != node.output[0])]
        offsets_name = next(i for i in offsets_mm.input if i in init)
        zeros = numpy_helper.to_array(init[node.input[3]])
        if zeros.any():
            raise SystemExit(f"{node.name}: zero points are not all 0; this script only centres zero-point-0 blocks")
        scales = numpy_helper.to_array(init[node.input[2]]).reshape(attrs["N"].i, -1)  # [N, K / block]
        offsets = numpy_helper.to_array(init[offsets_name])  # [K / block, N]
        init[node.input[3]].CopyFrom(numpy_helper.from_array(np.full_like(zeros, 0x88), node.input[3]))
        init[offsets_name].CopyFrom(numpy_helper.from_array((offsets + 8 * scales.T).astype(np.float32), offsets_name))
        centred += 1
    onnx.save(model, str(args.dst / "model.onnx"))
    print(f"{args.dst}: MatMulNBits (bits, accuracy_level) {dict(levels)}; centred {centred}")


if __name__ == "__main__":
    main()
