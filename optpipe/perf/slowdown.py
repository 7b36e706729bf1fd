"""A deliberately slower copy of an artifact, to show that the regression gate catches real slowdowns.

The slowdown is real compute inside the graph, not a sleep: a chain of `matmuls` dense N x N MatMuls that
starts from a value computed from the attention mask (so ONNX Runtime cannot constant-fold it) and ends in
`0 * sum(...)` added to the first output (so it is not dead code and the outputs stay bit-identical). Each
MatMul costs a fixed 2*N^3 flops, so the relative slowdown depends on the shape it is timed at; calibrate the
chain length against the model at the shape of interest (bench/calibration_study.py does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from optpipe.artifact import MANIFEST, Artifact


def inject_work(src: Path, dst: Path, matmuls: int, size: int = 128) -> None:
    """Write `src` to `dst` with a chain of `matmuls` size x size MatMuls feeding the first output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    seed_input = next((i.name for i in graph.input if i.name in ("attention_mask", "input_ids")), graph.input[0].name)
    # An orthogonal matrix keeps the chain's values bounded however long it is.
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((size, size)))
    graph.initializer.extend([numpy_helper.from_array(q.astype(np.float32), "optpipe_slow_w"),
                              numpy_helper.from_array(np.array(0.0, np.float32), "optpipe_slow_zero")])
    nodes = [helper.make_node("ReduceMax", [seed_input], ["optpipe_slow_m"], keepdims=0),
             helper.make_node("Cast", ["optpipe_slow_m"], ["optpipe_slow_s"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["optpipe_slow_w", "optpipe_slow_s"], ["optpipe_slow_x0"])]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"optpipe_slow_x{i}", "optpipe_slow_w"], [f"optpipe_slow_x{i + 1}"]))
    output = graph.output[0].name
    kept = f"{output}_before_slowdown"
    for node in graph.node:
        node.output[:] = [kept if o == output else o for o in node.output]
    nodes += [helper.make_node("ReduceSum", [f"optpipe_slow_x{matmuls}"], ["optpipe_slow_sum"], keepdims=0),
              helper.make_node("Mul", ["optpipe_slow_sum", "optpipe_slow_zero"], ["optpipe_slow_nil"]),
              helper.make_node("Add", [kept, "optpipe_slow_nil"], [output])]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))


def slowed_copy(artifact_dir: str | Path, dest: str | Path, matmuls: int, size: int = 128) -> Path:
    """A copy of the artifact whose first component carries the injected work (recorded in its manifest)."""
    artifact = Artifact.load(artifact_dir)
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(artifact.path, dest)
    component = artifact.components[0].name
    inject_work(artifact.path / component, dest / component, matmuls, size)
    manifest = {**artifact.manifest, "slowdown": {"component": component, "matmuls": matmuls, "size": size,
                                                  "extra_flops": 2 * matmuls * size ** 3}}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return dest
