"""Pareto table of structured pruning on the bundled all-MiniLM-L6-v2: FFN sparsity x recovery -> speed and fidelity.

Speed depends only on the pruned shapes, so each sparsity is built once (no recovery) as fp32 (export+fuse) and
INT8 (export+fuse+dynamic quantize) and timed interleaved against cpu-fp32 and cpu-int8 with
optpipe.perf.harness.interleaved_ratios (spinning off). Fidelity depends on recovery, so each sparsity is pruned once in
torch and recovered in stages (none -> refit -> distill to D1 s -> distill on to D2 s), with the held-out mean
cosine vs the unpruned model after each stage (validation texts: never used for pruning or recovery).

    python bench/prune_pareto.py --out /tmp/prune-bench --json bench/results/prune_pareto.json \
        --sparsities 0.1 0.2 0.3 0.4 --distill 120 600
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOOSE = ["validate.mean_cosine=0", "validate.min_cosine=-1"]  # the bench records fidelity, it does not gate it


def build(out: Path, sparsities: list[float]) -> dict[str, Path]:
    from optpipe import optimize

    paths = {"cpu-fp32": out / "cpu-fp32", "cpu-int8": out / "cpu-int8"}
    optimize(None, "cpu-fp32", paths["cpu-fp32"], overwrite=True)
    optimize(None, "cpu-int8", paths["cpu-int8"], overwrite=True)
    for s in sparsities:
        prune = f"prune{{sparsity={s},activation_scaled=true}}"
        for name, tail in (("fp32", "export,fuse"), ("int8", "export,fuse,quantize{keep_float=[ffn_output]}")):
            key = f"ffn{int(s * 100)}-{name}"
            paths[key] = out / key
            optimize(None, "cpu-int8-pruned", paths[key], pipeline=f"{prune},{tail}", overrides=LOOSE,
                     overwrite=True)
    return paths


def speed(paths: dict[str, Path], seconds: float, threads: int | None) -> dict[str, dict[str, float]]:
    from optpipe.perf.harness import interleaved_ratios

    names = list(paths)
    table = {}
    for base in ("cpu-fp32", "cpu-int8"):
        order = [base] + [n for n in names if n != base]
        ratios = interleaved_ratios([paths[n] for n in order], batch=1, seq=128, threads=threads, seconds=seconds)
        for name, r in zip(order, ratios):
            # ratio = latency / base latency; speed-up = its inverse
            table.setdefault(name, {})[f"speedup_vs_{base}"] = round(1 / r.ratio, 3)
            table[name][f"speedup_vs_{base}_ci"] = [round(1 / r.high, 3), round(1 / r.low, 3)]
    return table


def fidelity(sparsities: list[float], distill: list[float], unlabeled: bool = True, lr: float | None = None) -> list[dict]:
    import torch

    from optpipe.passes.prune import PruneConfig
    from optpipe.passes.prune_strategies import distill_student, load_model, make_data, shrink, stage
    from optpipe.passes.prune_model import ffn_layers
    from optpipe.passes.prune_recovery import refit, split_texts
    from optpipe.source import bundled_model_dir
    from optpipe.data.texts import calibration_texts, unlabeled_texts, validation_texts

    torch.manual_seed(0)
    teacher, tok = load_model(bundled_model_dir())
    split = split_texts(calibration_texts(), validation_texts(), unlabeled_texts() if unlabeled else ())
    data = make_data(tok, split)
    rows = []
    for s in sparsities:
        config = PruneConfig(sparsity=s, activation_scaled=True, distill_steps=10**6, unlabeled=unlabeled,
                             **({"distill_lr": lr} if lr else {}))
        t0 = time.perf_counter()
        student, _ = shrink(teacher, "bert", s, config, data)
        row = {"ffn_sparsity": s, "none": stage("prune", student, teacher, data, time.perf_counter() - t0)}
        t0 = time.perf_counter()
        refit(student, teacher, ffn_layers(student, "bert"), ffn_layers(teacher, "bert"), data.tune,
              config.refit_alpha)
        row["refit"] = stage("refit", student, teacher, data, time.perf_counter() - t0)
        spent = 0.0
        for budget in distill:
            t0 = time.perf_counter()
            facts = distill_student(student, teacher, config, data, _Ctx(), budget - spent)
            spent = budget
            row[f"refit+distill{int(budget)}s"] = stage("distill", student, teacher, data,
                                                        time.perf_counter() - t0, **facts)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


class _Ctx:
    @staticmethod
    def progress(message: str) -> None:
        print(message, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the artifacts are built")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--distill", type=float, nargs="*", default=[120.0, 600.0],
                        help="cumulative distillation budgets in seconds after refit (empty: none)")
    parser.add_argument("--seconds", type=float, default=20.0, help="interleaved timing per comparison")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-unlabeled", action="store_true",
                        help="recover on the 32 calibration texts only (prune.unlabeled=false)")
    parser.add_argument("--distill-lr", type=float, default=None, help="prune.distill_lr (default: the pass's)")
    parser.add_argument("--skip", choices=["speed", "fidelity"], action="append", default=[])
    args = parser.parse_args()
    result: dict = {"model": "sentence-transformers/all-MiniLM-L6-v2", "batch": 1, "seq": 128,
                    "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "command": " ".join(os.sys.argv)}
    if "speed" not in args.skip:
        paths = build(args.out, args.sparsities)
        result["speed"] = speed(paths, args.seconds, args.threads)
        print(json.dumps(result["speed"], indent=1), flush=True)
    if "fidelity" not in args.skip:
        result["fidelity"] = fidelity(args.sparsities, args.distill, not args.no_unlabeled, args.distill_lr)
    result["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
