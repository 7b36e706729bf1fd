"""optpipe tune: build candidate recipes, time them interleaved against fp32, and let neural-compressor's tuning
engine pick the fastest whose loss is within the budget; the winner is published as `optimize` does.

How neural-compressor's engine is used (neural_compressor.common.base_tuning): each recipe is a BaseConfig in a
TuningConfig(tolerable_loss=max_loss); init_tuning gives the ConfigLoader, TuningLogger and TuningMonitor; an
Evaluator scores each trial; the monitor applies its relative-loss rule and stops at the first trial within it.
That rule picks the *first* acceptable recipe in sampler order and knows nothing of speed, so optpipe measures
every candidate's speed first (one interleaved run) and hands the engine the recipes fastest first: its first
acceptable trial is then the fastest one within budget, and slower recipes need no loss evaluation at all.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from optpipe.artifact import Artifact, prepare_destination
from optpipe.errors import OptpipeError, TuningFailedError
from optpipe.pipeline import ModelFiles, Pipeline
from optpipe.targets.recipe import PassSpec, format_pipeline
from optpipe.source import ModelSource, resolve_source
from optpipe.targets import Target, load_target, with_isa_numerics

log = logging.getLogger("optpipe.tune")

SENSITIVE_FALLBACK = 4  # weighted nodes kept float by the "sensitive float" candidates


@dataclass(frozen=True)
class Recipe:
    """One candidate: fused or not, and the quantize pass's options."""

    label: str
    fuse: bool
    quantize: dict[str, Any]

    @property
    def specs(self) -> list[PassSpec]:
        fuse = [PassSpec("fuse", {"flavor": "cpu"})] if self.fuse else []
        return [PassSpec("export"), *fuse, PassSpec("quantize", dict(self.quantize))]

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.specs)


def candidate_recipes() -> list[Recipe]:
    """The default search space: dynamic/static, per-channel or not, op types, float fallbacks, fusion."""
    return [
        Recipe("static qdq, sensitive float", True, {"mode": "static", "op_types": ["MatMul"],
                                                     "sensitivity_fallback": SENSITIVE_FALLBACK}),
        Recipe("static qdq", True, {"mode": "static", "op_types": ["MatMul"]}),
        Recipe("dynamic", True, {"mode": "dynamic"}),
        Recipe("dynamic, outlier channels float", True, {"mode": "dynamic", "outlier_channels": 3.0}),  # = cpu-int8
        Recipe("dynamic, FFN-out float", True, {"mode": "dynamic", "keep_float": ["ffn_output"]}),
        Recipe("dynamic, per-tensor", True, {"mode": "dynamic", "per_channel": False}),
        Recipe("dynamic, MatMul only", True, {"mode": "dynamic", "op_types": ["MatMul"]}),
        Recipe("dynamic, unfused", False, {"mode": "dynamic"}),
    ]


def sensitive_recipes(nodes: list[str]) -> list[Recipe]:
    """Candidates that reuse the sensitivity ranking of the static run (same fused graph, same node names)."""
    if not nodes:
        return []
    return [
        Recipe("dynamic, sensitive float", True, {"mode": "dynamic", "exclude_nodes": nodes}),
        Recipe("static qoperator, sensitive float", True, {"mode": "static", "quant_format": "qoperator",
                                                          "exclude_nodes": nodes}),
    ]


@dataclass(frozen=True)
class Candidate:
    recipe: str
    pipeline: str
    status: str  # winner | accepted | rejected | not evaluated | failed
    why: str
    latency_ratio: float | None = None  # candidate latency / fp32 latency (< 1: faster)
    ratio_low: float | None = None
    ratio_high: float | None = None
    loss: float | None = None
    score: float | None = None
    bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TuneResult:
    artifact: Artifact
    candidates: tuple[Candidate, ...]
    max_loss: float
    loss_metric: str
    baseline: float
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def winner(self) -> Candidate:
        return next(c for c in self.candidates if c.status == "winner")


def _base_target(max_loss: float, fidelity_metric: str | None) -> Target:
    base = load_target("cpu-int8")
    thresholds = {fidelity_metric: round(1.0 - max_loss, 6)} if fidelity_metric else {}
    return replace(base, name="cpu-int8-tuned", validate=thresholds,
                   description="the fastest CPU INT8 recipe within a loss budget, chosen by optpipe tune")


def _build(recipe_specs: list[PassSpec], source: ModelSource, target: Target, workdir: Path, use_cache: bool,
           calibration: str | None):
    from optpipe.passes import PASSES

    return Pipeline(recipe_specs, PASSES).run(source, target, workdir, log.debug, use_cache=use_cache,
                                              calibration=calibration)


def _ratios(paths: list[Path], seconds: float, threads: int | None) -> list[tuple[float, float, float]]:
    """(ratio, low, high) of each model's latency to the first's: the harness's paired interleaved rounds."""
    from optpipe.perf.harness import interleaved_ratios

    return [(r.ratio, r.low, r.high)
            for r in interleaved_ratios(paths, batch=1, seq=128, threads=threads, seconds=seconds)]


def tune(
    model: str | Path | None = None,
    max_loss: float = 0.01,
    output: str | Path | None = None,
    *,
    eval_file: str | Path | None = None,
    task: str | None = None,
    calibration: str | Path | None = None,
    seconds: float = 30.0,
    threads: int | None = None,
    recipes: list[Recipe] | None = None,
    score_all: bool = True,
    overwrite: bool = False,
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Publish the fastest candidate recipe whose loss vs the PyTorch model (or on `eval_file`) is <= max_loss.

    score_all=False leaves the loss of candidates slower than the winner unmeasured (the search never needs it).
    """
    from optpipe.api import check_calibration, default_output, optimize
    from optpipe.tune.evaluate import accuracy_scorer, fidelity_metric, fidelity_scorer

    say = progress or log.info
    if not 0.0 <= max_loss < 1.0:
        raise OptpipeError(f"--max-loss must be in [0, 1), not {max_loss}")
    calibration_spec, _ = check_calibration(calibration)
    source = resolve_source(str(model) if model is not None else None, task)
    scorer = accuracy_scorer(source, eval_file) if eval_file else None
    target = _base_target(max_loss, None if scorer else fidelity_metric(source.task))
    scorer = scorer or fidelity_scorer(source, target)
    dest = Path(output) if output is not None else default_output(source, target)
    dest = dest.expanduser().resolve()
    prepare_destination(dest, overwrite)
    pending = list(recipes or candidate_recipes())
    say(f"tuning {source.model_id} ({source.task}): {len(pending)}+ candidates, loss = {scorer.describe}, "
        f"budget {max_loss}")
    workdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tune-", dir=dest.parent))
    try:
        built, candidates = _score(pending, source, target, workdir, use_cache, calibration_spec, scorer, max_loss,
                                   seconds, threads, score_all, say)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    winner = _winner(candidates, max_loss, say)
    tuning = {"max_loss": max_loss, "loss": scorer.describe, "metric": scorer.metric, "baseline": scorer.baseline,
              "timing": {"seconds": seconds, "batch": 1, "sequence_length": 128, "threads": threads,
                         "reference": "fp32 (export,fuse{flavor=cpu})"},
              "engine": "neural_compressor.common.base_tuning", "candidates": [c.to_json() for c in candidates]}
    winner_target = replace(target, passes=tuple(next(r for r, _ in built if r.pipeline == winner.pipeline).specs))
    artifact = optimize(model, winner_target, dest, task=task, overwrite=overwrite, use_cache=use_cache,
                        calibration=calibration, progress=say, extra_manifest={"tuning": tuning})
    return TuneResult(artifact, tuple(candidates), max_loss, scorer.metric, scorer.baseline, tuning["timing"])


def _score(pending: list[Recipe], source, target, workdir, use_cache, calibration, scorer, max_loss: float,
           seconds: float, threads: int | None, score_all: bool, say) -> tuple[list, list[Candidate]]:
    """Build every candidate, time them interleaved with the fp32 reference, and score them fastest first."""
    reference = _build([PassSpec("export"), PassSpec("fuse", {"flavor": "cpu"})], source, target, workdir,
                       use_cache, calibration)
    built, failed = _build_all(pending, source, target, workdir, use_cache, calibration, say)
    say(f"timing fp32 and {len(built)} candidates interleaved ({seconds:.0f} s, batch 1, 128 tokens) ...")
    paths = [reference.files.path / reference.files.components[0]]
    paths += [files.path / files.components[0] for _, files in built]
    ratios = _ratios(paths, seconds, threads)[1:]
    return built, _search(built, ratios, scorer, max_loss, say, score_all) + failed


def _winner(candidates: list[Candidate], max_loss: float, say) -> Candidate:
    """The winning candidate, or TuningFailedError naming the lowest loss seen."""
    winner = next((c for c in candidates if c.status == "winner"), None)
    if winner is None:
        for line in format_table(candidates):
            say(line)
        best = min((c for c in candidates if c.loss is not None), key=lambda c: c.loss, default=None)
        raise TuningFailedError(f"no candidate recipe is within --max-loss {max_loss}"
                                + (f" (lowest loss {best.loss:.4f}: {best.recipe})" if best else "")
                                + "; nothing was published")
    say(f"winner: {winner.recipe} (latency x{winner.latency_ratio:.3f} of fp32, loss {winner.loss:.4f}); publishing")
    return winner


def _with_target_numerics(recipe: Recipe, target: Target) -> Recipe:
    """The recipe with the weights the target's ISA calls for (cpu-int8: portable, 7-bit) unless it sets them."""
    specs = with_isa_numerics(tuple(recipe.specs), target.isa)
    return replace(recipe, quantize=dict(next(s for s in specs if s.name == "quantize").options))


def _build_all(pending: list[Recipe], source, target, workdir, use_cache, calibration, say):
    built: list[tuple[Recipe, ModelFiles]] = []
    failed: list[Candidate] = []
    queue = list(pending)
    while queue:
        recipe = _with_target_numerics(queue.pop(0), target)
        say(f"  building: {recipe.label} [{recipe.pipeline}]")
        try:
            result = _build(recipe.specs, source, target, workdir, use_cache, calibration)
        except OptpipeError as exc:
            failed.append(Candidate(recipe.label, recipe.pipeline, "failed", f"build failed: {exc}"))
            continue
        built.append((recipe, result.files))
        kept = result.steps[-1].report.get("components", {})
        sensitive = [name for comp in kept.values() for name in comp.get("kept_by_sensitivity", ())]
        if recipe.quantize.get("sensitivity_fallback"):
            queue.extend(sensitive_recipes(sensitive))
    return built, failed


def _nc_recipe_config():
    from neural_compressor.common.base_config import BaseConfig

    class RecipeConfig(BaseConfig):
        """One optpipe candidate recipe, as a neural-compressor config (its pipeline text is its one param)."""

        name = "optpipe_recipe"
        params_list = ["recipe"]

        def __init__(self, recipe: str = "", white_list=None):
            super().__init__(white_list=white_list)
            self.recipe = recipe

        def expand(self):
            return [self]

        @classmethod
        def register_supported_configs(cls):
            return None

        @classmethod
        def get_config_set_for_tuning(cls):
            return None

    return RecipeConfig


def _search(built, ratios, scorer, max_loss: float, say, score_all: bool = True) -> list[Candidate]:
    """neural-compressor's tuning loop over the built candidates, fastest first; then, for a complete table,
    the loss of the slower candidates the loop did not need (unless `score_all` is false)."""
    nc_logger = logging.getLogger("neural_compressor")
    level = nc_logger.level
    from neural_compressor.common.base_tuning import Evaluator, TuningConfig, init_tuning

    if level:  # importing neural-compressor resets its logger's level; keep the one the caller chose
        nc_logger.setLevel(level)
    RecipeConfig = _nc_recipe_config()
    order = sorted(range(len(built)), key=lambda i: ratios[i][0])
    by_pipeline = {built[i][0].pipeline: (built[i], ratios[i]) for i in order}
    configs = [RecipeConfig(built[i][0].pipeline) for i in order]
    evaluator = Evaluator()
    evaluator.set_eval_fn_registry({"eval_fn": lambda files: scorer.score(files), "name": scorer.metric})
    tuning_config = TuningConfig(config_set=configs, tolerable_loss=max_loss, max_trials=len(configs))
    loader, tuning_logger, monitor = init_tuning(tuning_config)
    monitor.set_baseline(scorer.baseline)
    scored: dict[str, float] = {}
    tuning_logger.tuning_start()
    for trial, config in enumerate(loader, start=1):
        (recipe, files), _ = by_pipeline[config.recipe]
        tuning_logger.trial_start(trial_index=trial)
        value = evaluator.evaluate(files)
        monitor.add_trial_result(trial, value, config)
        scored[config.recipe] = value
        say(f"  trial {trial}: {recipe.label}: {scorer.metric} {value:.4f}, loss {scorer.loss(value):.4f}")
        tuning_logger.trial_end(trial)
        if monitor.need_stop():
            break
    tuning_logger.tuning_end()
    goal = scorer.baseline * (1 - max_loss)
    winner = next((r.quant_config.recipe for r in monitor.tuning_history if r.trial_result >= goal), None)
    searched = set(scored)
    if score_all:
        for index in order:
            recipe, files = built[index]
            if recipe.pipeline not in scored:
                scored[recipe.pipeline] = scorer.score(files)
    rows = []
    for index in order:
        recipe, files = built[index]
        ratio, low, high = ratios[index]
        value = scored.get(recipe.pipeline)
        loss = None if value is None else round(scorer.loss(value), 6)
        if value is None:
            status, why = "not evaluated", "slower than the winner, which already met the budget"
        elif recipe.pipeline == winner:
            status, why = "winner", f"fastest within the budget (loss {loss:.4f} <= {max_loss})"
        elif value >= goal:
            status, why = "accepted", "within the budget, slower than the winner"
        else:
            status, why = "rejected", f"loss {loss:.4f} > budget {max_loss}"
        if value is not None and recipe.pipeline not in searched:
            why += " (scored after the search, for the table)"
        rows.append(Candidate(recipe.label, recipe.pipeline, status, why, round(ratio, 4), round(low, 4),
                              round(high, 4), loss, None if value is None else round(value, 6), files.onnx_bytes()))
    return rows


def format_table(candidates: list[Candidate] | tuple[Candidate, ...]) -> list[str]:
    """The candidate table as text lines (latency relative to fp32 with its interval)."""
    lines = [f"{'recipe':<34} {'latency/fp32':>20} {'loss':>8} {'size':>9}  verdict"]
    for c in candidates:
        ratio = "-" if c.latency_ratio is None else f"{c.latency_ratio:.3f} [{c.ratio_low:.3f},{c.ratio_high:.3f}]"
        loss = "-" if c.loss is None else f"{c.loss:.4f}"
        size = "-" if c.bytes is None else f"{c.bytes / 1e6:.1f} MB"
        lines.append(f"{c.recipe:<34} {ratio:>20} {loss:>8} {size:>9}  {c.status}: {c.why}")
    return lines
