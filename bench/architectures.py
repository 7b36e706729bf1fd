"""Every architecture of issue 3 through cpu-fp32 and cpu-int8 on the tiny test models: fidelity and graph facts.

The models are the test builders (tests/models.py: random init, generators fitted 30 steps on the calibration
texts), so the figures say what the pipeline preserves, not how good a model is.

    HF_HUB_OFFLINE=1 python bench/architectures.py --out /tmp/arch-bench --json bench/results/architectures.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optpipe import optimize  # noqa: E402
from tests import models  # noqa: E402

MODELS = ["bert-sequence-classification", "distilbert-sequence-classification", "roberta-sequence-classification",
          "roberta-token-classification", "electra-sequence-classification", "albert-token-classification",
          "distilbert", "roberta", "mpnet", "gpt2", "llama", "qwen2", "t5", "bart"]


def build(name: str, root: Path) -> Path:
    arch, _, head = name.partition("-")
    path = root / "models" / name
    if not (path / "config.json").is_file():
        builder = getattr(models, f"tiny_{arch}")
        builder(path, head=head) if head else builder(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.models.split(","):
        source = build(name, args.out)
        for target in ("cpu-fp32", "cpu-int8"):
            started = time.perf_counter()
            artifact = optimize(str(source), target=target, output=args.out / "artifacts" / f"{name}-{target}",
                                overwrite=True)
            m = artifact.manifest
            quant = next((p["report"] for p in m["passes"] if p["name"] == "quantize"), {"components": {}})
            rows.append({
                "model": name, "target": target, "task": m["source"]["task"],
                "seconds": round(time.perf_counter() - started, 1),
                "metrics": m["validation"]["metrics"],
                "components": {c: {"fused": m["graph"][c]["fused_ops"],
                                   "quantized_nodes": quant["components"].get(c, {}).get("quantized_nodes", 0)}
                               for c in m["components"]},
                "fuse_note": next(p["report"].get("note") for p in m["passes"] if p["name"] == "fuse"),
            })
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in rows[-1]["metrics"].items())
            parts = "; ".join(f"{c}: fused {sum(v['fused'].values())}, int8 {v['quantized_nodes']}"
                              for c, v in rows[-1]["components"].items())
            sys.stdout.write(f"{name:36s} {target:9s} {metrics}\n{'':46s}{parts}\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
