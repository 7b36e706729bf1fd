"""The two pruning strategies of the prune pass: unstructured masks, and structured FFN/head removal with a search over
candidate sparsities under a fidelity floor; each with its recovery stages (refit, distill)."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optpipe.errors import InvalidOptionError
from optpipe.passbase import PassContext
from optpipe.source import load_tokenizer

if TYPE_CHECKING:
    from optpipe.passes.prune import PruneConfig


@dataclass(frozen=True)
class PruneData:
    tokenizer: Any
    tune: list  # tokenized batches (texts and concatenated pairs) for activations and refit
    dev: list
    held_out: list
    tune_texts: tuple[str, ...]


def make_data(tokenizer, split) -> PruneData:
    from optpipe.passes.prune_recovery import augmented, encode

    return PruneData(tokenizer, encode(tokenizer, augmented(split.tune)), encode(tokenizer, split.dev),
                 encode(tokenizer, split.held_out), split.tune)


def load_model(path: Path):
    import json

    import transformers

    config = json.loads((path / "config.json").read_text())
    arch = next(iter(config.get("architectures") or []), None)
    cls = getattr(transformers, arch, None) if arch else None
    model = (cls or transformers.AutoModel).from_pretrained(path, dtype="float32").eval()
    return model, load_tokenizer(path)


def calibration_texts(ctx: PassContext) -> tuple[str, ...]:
    from optpipe.data.calibration import load_calibration

    return load_calibration(ctx.calibration).texts


def stage(name: str, student, teacher, data: PruneData, seconds: float, **extra) -> dict[str, Any]:
    from optpipe.passes.prune_recovery import fidelity

    return {"stage": name, "dev_cosine": fidelity(student, teacher, data.dev),
            "held_out_cosine": fidelity(student, teacher, data.held_out), "seconds": round(seconds, 1), **extra}


def distill_student(student, teacher, config: PruneConfig, data: PruneData, ctx: PassContext, seconds: float, masks=None):
    from optpipe.passes.prune_recovery import DistillSettings, distill

    settings = DistillSettings(config.distill_steps, seconds, config.distill_lr, config.distill_batch, config.seed)
    return distill(student, teacher, data.tokenizer, data.tune_texts, settings, ctx.progress, masks)


def unstructured(teacher, config: PruneConfig, data: PruneData, ctx: PassContext):
    import torch

    from optpipe.passes.prune_model import apply_masks, is_conv1d, prunable_weights, unstructured_masks
    from optpipe.passes.prune_recovery import input_rms

    t0 = time.perf_counter()
    student = copy.deepcopy(teacher)
    modules = prunable_weights(student)
    rms = None
    if config.activation_scaled:
        names = list(modules)
        rms = dict(zip(names, input_rms(student, modules, data.tune, names)))
    masks = unstructured_masks(modules, config.sparsity, config.scope, config.max_layer_sparsity, rms)
    per_layer = apply_masks(modules, masks)
    stages = [stage("prune", student, teacher, data, time.perf_counter() - t0)]
    notes = []
    if "refit" in config.recovery:
        notes.append("refit applies to structured pruning only (it refits a shrunk down-projection); skipped")
    if "distill" in config.recovery:
        ctx.progress(f"  distilling (<= {config.distill_steps} steps, <= {config.distill_seconds:.0f}s)")
        t0 = time.perf_counter()
        keep = {m: (masks[n].T if is_conv1d(m) else masks[n]).to(torch.float32) for n, m in modules.items()}
        facts = distill_student(student, teacher, config, data, ctx, config.distill_seconds, keep)
        stages.append(stage("distill", student, teacher, data, time.perf_counter() - t0, **facts))
        per_layer = apply_masks(modules, masks)
    total = sum(m.weight.numel() for m in modules.values())
    zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
    report = {"sparsity": round(zeros / total, 4), "requested_sparsity": config.sparsity, "scope": config.scope,
              "per_layer_sparsity": per_layer, "stages": stages, "fidelity": stages[-1]["held_out_cosine"]}
    if notes:
        report["note"] = "; ".join(notes)
    return student, report


def shrink(teacher, model_type: str, sparsity: float, config: PruneConfig, data: PruneData):
    """A pruned copy of the teacher (FFN neurons and heads removed), and what was removed."""
    from optpipe.passes.prune_model import (attention_modules, ffn_layers, ffn_scores,
                                            head_out_projections, head_scores, remaining_heads,
                                            set_intermediate_size, shrink_ffn)
    from optpipe.passes.prune_recovery import ffn_activation_rms, input_rms

    student = copy.deepcopy(teacher)
    layers = ffn_layers(student, model_type)
    width = layers[0].width
    floor = math.ceil((1.0 - config.max_layer_sparsity) * width)
    keep_n = max(1, floor, width - int(round(sparsity * width)))
    rms = ffn_activation_rms(student, layers, data.tune) if config.activation_scaled else None
    for i, layer in enumerate(layers):
        scores = ffn_scores(layer, rms[i] if rms is not None else None)
        shrink_ffn(layer, scores.argsort(descending=True)[:keep_n])
    set_intermediate_size(student, model_type, keep_n)
    removed_heads: dict[int, list[int]] = {}
    if config.heads:
        attns = attention_modules(student, model_type)
        outs = head_out_projections(student, model_type)
        ctx_rms = (input_rms(student, {str(i): m for i, m in enumerate(outs)}, data.tune,
                             [str(i) for i in range(len(outs))]) if config.activation_scaled else None)
        for i, (attn, scores) in enumerate(zip(attns, head_scores(student, model_type, ctx_rms))):
            if config.heads >= len(scores):
                raise InvalidOptionError(f"prune.heads={config.heads} would empty layer {i} ({len(scores)} heads)")
            original = remaining_heads(attn)
            removed_heads[i] = sorted(original[int(h)] for h in scores.argsort()[:config.heads])
        student.prune_heads(removed_heads)
    return student, {"ffn_width_before": width, "ffn_width_after": keep_n,
                     "ffn_sparsity": round(1 - keep_n / width, 4), "heads_removed": removed_heads}


def structured(teacher, model_type: str, config: PruneConfig, data: PruneData, ctx: PassContext):
    from optpipe.passes.prune_model import ffn_layers
    from optpipe.passes.prune_recovery import refit

    candidates = sorted(set(config.candidates or (config.sparsity,)), reverse=True)
    deadline = time.perf_counter() + config.time_budget_s
    floor = config.min_fidelity
    tried: list[dict[str, Any]] = []
    models: dict[float, Any] = {}
    chosen = None
    for sparsity in candidates:
        ctx.progress(f"  pruning {sparsity:.0%} of FFN neurons" + (f", {config.heads} heads" if config.heads else "")
                     + " per layer")
        t0 = time.perf_counter()
        student, shape = shrink(teacher, model_type, sparsity, config, data)
        stages = [stage("prune", student, teacher, data, time.perf_counter() - t0)]
        if "refit" in config.recovery and shape["ffn_width_after"] == shape["ffn_width_before"]:
            # with every neuron kept, a refit only overfits the few calibration tokens (MiniLM, 2 heads: 0.952 -> 0.939)
            stages.append({"stage": "refit", "skipped": "no FFN neuron removed"})
        elif "refit" in config.recovery:
            t0 = time.perf_counter()
            layers = refit(student, teacher, ffn_layers(student, model_type), ffn_layers(teacher, model_type),
                           data.tune, config.refit_alpha)
            stages.append(stage("refit", student, teacher, data, time.perf_counter() - t0, layers=layers))
        left = deadline - time.perf_counter()
        dev = [s for s in stages if "dev_cosine" in s][-1]["dev_cosine"]
        if "distill" in config.recovery:
            if dev < floor - config.distill_reach:
                stages.append({"stage": "distill", "skipped": f"dev cosine {dev} is more than {config.distill_reach} "
                                                              f"below the floor {floor}"})
            elif left < 10:
                stages.append({"stage": "distill", "skipped": "time budget spent"})
            else:
                seconds = min(config.distill_seconds, left)
                ctx.progress(f"  distilling {sparsity:.0%} (<= {config.distill_steps} steps, <= {seconds:.0f}s)")
                t0 = time.perf_counter()
                facts = distill_student(student, teacher, config, data, ctx, seconds)
                stages.append(stage("distill", student, teacher, data, time.perf_counter() - t0, **facts))
        done = [s for s in stages if "dev_cosine" in s]
        entry = {"ffn_sparsity": shape["ffn_sparsity"], "heads": config.heads, "dev_cosine": done[-1]["dev_cosine"],
                 "held_out_cosine": done[-1]["held_out_cosine"], "stages": stages, **shape}
        tried.append(entry)
        models[sparsity] = student
        ctx.progress(f"    {sparsity:.0%}: dev cosine {entry['dev_cosine']}, held-out {entry['held_out_cosine']}")
        if entry["dev_cosine"] >= floor:
            chosen = sparsity
            break
    reason = f"largest candidate whose dev cosine >= {floor}"
    if chosen is None:
        best = max(tried, key=lambda e: e["dev_cosine"])
        chosen = candidates[tried.index(best)]
        reason = f"no candidate reached the floor {floor}; best dev cosine kept"
    picked = tried[candidates.index(chosen)]
    report = {"sparsity": picked["ffn_sparsity"], "chosen": f"{chosen:.0%} FFN ({reason})",
              "floor": floor, "floor_met": picked["dev_cosine"] >= floor,
              "ffn_width": [picked["ffn_width_before"], picked["ffn_width_after"]],
              "heads_removed": picked["heads_removed"], "stages": picked["stages"],
              "fidelity": picked["held_out_cosine"], "candidates": [
                  {k: e[k] for k in ("ffn_sparsity", "dev_cosine", "held_out_cosine")} | {
                      "seconds": round(sum(s.get("seconds", 0) for s in e["stages"]), 1)} for e in tried]}
    return models[chosen], report
