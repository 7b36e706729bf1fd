"""prune: magnitude pruning on the torch model, before export. Structured (FFN neurons, attention heads) physically
shrinks the layers so dense kernels do less work; unstructured zeroes scattered weights, which only compresses.
Recovery (refit, distill) and the choice of sparsity under a fidelity floor live here too; the model surgery is
in prune_model.py and the recovery in prune_recovery.py."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from optpipe.errors import InvalidOptionError
from optpipe.passbase import ModelFiles, Pass, PassContext, PassResult, Report, copy_aux_files

log = logging.getLogger("optpipe.prune")

RECOVERY = ("refit", "distill")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json", "config.json")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "magnitude"
    granularity: str = "structured"  # "structured" (FFN neurons, attention heads) or "unstructured"
    # structured: share of FFN intermediate neurons removed in every layer; unstructured: share of the
    # Linear/Conv1D weights zeroed
    sparsity: float = 0.3
    heads: int = 0  # structured: attention heads removed in every layer
    scope: str = "per_layer"  # unstructured threshold: "per_layer" or "global"
    activation_scaled: bool = False  # scale weight magnitudes by activation RMS on the calibration texts
    max_layer_sparsity: float = 0.9  # no layer loses more than this share, so none is emptied
    recovery: tuple[str, ...] = ()  # any of "refit", "distill", applied in that order
    refit_alpha: float = 0.1  # ridge strength, relative to the mean activation energy (0.1 beat 0.01 on MiniLM)
    distill_steps: int = 400
    distill_seconds: float = 120.0
    distill_lr: float = 1e-4
    distill_batch: int = 16
    # structured: FFN sparsities to try; the largest whose recovered fidelity on held-out calibration texts
    # reaches min_fidelity wins (empty: just `sparsity`)
    candidates: tuple[float, ...] = ()
    min_fidelity: float = 0.0
    # a candidate is distilled only if refit left it within this much of the floor (distillation costs minutes)
    distill_reach: float = 0.1
    time_budget_s: float = 600.0  # distillation across all candidates (prune and refit are not cut short)
    # add optpipe's built-in unlabeled English text (data/unlabeled.txt, 1200 lines) to the calibration texts for
    # recovery: refit and distillation overfit 32 sentences (MiniLM, 20 % FFN + refit, held-out cosine: 0.941 on
    # them alone, 0.965 with the unlabeled lines)
    unlabeled: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.method != "magnitude":
            raise InvalidOptionError(f"prune.method must be 'magnitude', not {self.method!r}")
        if self.granularity not in ("structured", "unstructured"):
            raise InvalidOptionError(f"prune.granularity must be 'structured' or 'unstructured', not {self.granularity!r}")
        if self.scope not in ("per_layer", "global"):
            raise InvalidOptionError(f"prune.scope must be 'per_layer' or 'global', not {self.scope!r}")
        for value in (self.sparsity, *self.candidates):
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise InvalidOptionError(f"prune sparsities must be in [0, 1), not {value!r}")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise InvalidOptionError(f"prune.max_layer_sparsity must be in (0, 1), not {self.max_layer_sparsity}")
        unknown = sorted(set(self.recovery) - set(RECOVERY))
        if unknown:
            raise InvalidOptionError(f"prune.recovery: unknown step {', '.join(unknown)} (steps: refit, distill)")
        if isinstance(self.heads, bool) or not isinstance(self.heads, int) or self.heads < 0:
            raise InvalidOptionError(f"prune.heads must be a whole number >= 0, not {self.heads!r}")
        if self.granularity == "unstructured" and (self.heads or self.candidates):
            raise InvalidOptionError("prune.heads and prune.candidates apply to granularity=structured only")


@dataclass(frozen=True)
class PruneReport(Report):
    method: str = "magnitude"
    granularity: str = "structured"
    sparsity: float = 0.0  # reached: share of FFN neurons removed (structured) or of weights zeroed (unstructured)
    fidelity: float = 0.0  # held-out mean cosine to the unpruned model after recovery
    stages: tuple[dict[str, Any], ...] = ()  # prune / refit / distill, each with its cosines and seconds
    params_before: int = 0
    params_after: int = 0
    linear_macs_per_seq128_before: int = 0
    linear_macs_per_seq128_after: int = 0
    macs_ratio: float = 1.0
    fidelity_texts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    note: str | None = None
    # unstructured
    requested_sparsity: float | None = None
    scope: str | None = None
    per_layer_sparsity: dict[str, float] | None = None
    # structured
    chosen: str | None = None
    floor: float | None = None
    floor_met: bool | None = None
    ffn_width: tuple[int, int] | None = None
    heads_removed: dict[str, list[int]] | None = None
    candidates: tuple[dict[str, Any], ...] | None = None


class PrunePass(Pass):
    name = "prune"
    consumes = "hf"
    produces = "hf"
    Config = PruneConfig
    Report = PruneReport
    reads_calibration = True

    def call(self, files: ModelFiles, config: PruneConfig, ctx: PassContext) -> PassResult:
        import torch

        from optpipe.data.texts import unlabeled_texts, validation_texts
        from optpipe.passes.prune_model import count_linear, structured_support
        from optpipe.passes.prune_recovery import split_texts
        from optpipe.passes.prune_strategies import calibration_texts, load_model, make_data, structured, unstructured

        model_type = ctx.source.model_type
        if config.granularity == "structured":
            structured_support(model_type)  # fail before loading anything
        torch.manual_seed(config.seed)
        teacher, tokenizer = load_model(files.path)
        split = split_texts(calibration_texts(ctx), validation_texts(), unlabeled_texts() if config.unlabeled else ())
        data = make_data(tokenizer, split)
        before = count_linear(teacher)
        started = time.perf_counter()
        if config.granularity == "unstructured":
            student, report = unstructured(teacher, config, data, ctx)
        else:
            student, report = structured(teacher, model_type, config, data, ctx)
        after = count_linear(student)
        report.update({
            "method": config.method + (" (activation-scaled)" if config.activation_scaled else ""),
            "granularity": config.granularity,
            "params_before": before["params"], "params_after": after["params"],
            "linear_macs_per_seq128_before": before["linear_macs_per_seq128"],
            "linear_macs_per_seq128_after": after["linear_macs_per_seq128"],
            "macs_ratio": round(after["linear_macs_per_seq128"] / before["linear_macs_per_seq128"], 4),
            "fidelity_texts": {"tune": len(split.tune), "dev (calibration, not trained on)": len(split.dev),
                               "held_out (validation texts, reported only)": len(split.held_out)},
            "seconds": round(time.perf_counter() - started, 1),
        })
        present = tuple(p.name for p in files.path.iterdir() if p.name in _WEIGHT_FILES)
        copy_aux_files(files.path, ctx.out_dir, skip=present)
        student.save_pretrained(ctx.out_dir)
        return PassResult(ModelFiles(ctx.out_dir, "hf"), PruneReport.from_json(report))


