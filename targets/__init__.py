"""Targets: one TOML recipe per hardware target. Load by name (bundled) or by path (your own)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from optpipe.errors import InvalidOptionError, UnknownTargetError, UnsupportedModelError
from optpipe.perf.isa import EXACT_FAMILIES, TARGET_ISAS, reduce_range_for
from optpipe.targets.recipe import PassSpec, format_pipeline, parse_pipeline, parse_value


@dataclass(frozen=True)
class Target:
    """A recipe: passes with options, the execution provider and its settings, and validation thresholds."""

    name: str
    description: str
    passes: tuple[PassSpec, ...]
    provider: str = "CPUExecutionProvider"
    provider_options: dict[str, Any] = field(default_factory=dict)
    fallback_providers: tuple[str, ...] = ()
    session_options: dict[str, Any] = field(default_factory=dict)
    validate: dict[str, Any] = field(default_factory=dict)
    harness: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    # A different recipe for decoders (task text-generation), from the TOML's [decoder] table: weight-only
    # quantization instead of dynamic INT8, and generation thresholds. `for_task` picks the one that applies.
    decoder_passes: tuple[PassSpec, ...] = ()
    decoder_validate: dict[str, Any] = field(default_factory=dict)
    decoder_validate_gguf: dict[str, Any] = field(default_factory=dict)  # stricter, when the source is a GGUF
    # CPU targets: the instruction-set family whose integer numerics the recipe is built for (perf/isa.py).
    # "portable" quantizes weights to 7 bits (quantize.reduce_range), exact on every CPU; "avx512_vnni", "amx" or
    # "arm_dotprod" keep 8 bits, which AVX2 kernels without VNNI saturate. None: not declared (GPU targets, and
    # cpu-fp32, which has no INT8 GEMM; `numerics_isa` says "portable" for it).
    isa: str | None = None

    @property
    def numerics_isa(self) -> str | None:
        """The family the integer numerics of this recipe, as configured, hold on: its `isa`, corrected by an
        explicit `quantize.reduce_range` or weight_type; "portable" without INT8 GEMMs; None off CPU."""
        if self.provider != "CPUExecutionProvider":
            return None
        specs = [s for s in self.passes if s.name == "quantize"]
        seven_bit = all(s.options.get("reduce_range") is True or s.options.get("weight_type") == "quint8"
                        for s in specs)
        if seven_bit:  # also: no quantize pass (float, or weight-only MatMulNBits)
            return self.isa if self.isa is not None and reduce_range_for(self.isa) else "portable"
        return self.isa if self.isa in EXACT_FAMILIES else "avx512_vnni"

    def for_task(self, task: str, gguf: bool = False) -> "Target":
        """The recipe as it runs for a model of `task`: for text-generation the decoder recipe when there is one
        (a --pipeline replaces it) and always the decoder thresholds."""
        decoder = self.decoder_passes or self.decoder_validate or self.decoder_validate_gguf
        if task == "text-generation" and decoder:
            validate = {**self.validate, **self.decoder_validate, **(self.decoder_validate_gguf if gguf else {})}
            return replace(self, passes=self.decoder_passes or self.passes, validate=validate, decoder_passes=(),
                           decoder_validate={}, decoder_validate_gguf={})
        if not self.passes:
            raise UnsupportedModelError(
                f"target {self.name} is for decoders (text-generation models), not {task}; for this model use "
                "cpu-int8 (dynamic INT8) or cpu-int8-static")
        return replace(self, decoder_passes=(), decoder_validate={}, decoder_validate_gguf={})

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def pass_spec(self, name: str) -> PassSpec | None:
        return next((spec for spec in (*self.passes, *self.decoder_passes) if spec.name == name), None)

    def with_pipeline(self, text: str) -> "Target":
        """Replace the recipe (for every model kind) with a one-line pipeline."""
        return replace(self, passes=with_isa_numerics(tuple(parse_pipeline(text)), self.isa), decoder_passes=(),
                       overrides=(*self.overrides, f"pipeline={text}"))

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> "Target":
        """Apply `section.key=value` overrides: a pass name, `validate`, `provider_options`, `session_options`,
        `harness` or `target.isa`."""
        target = self
        for assignment in assignments:
            dotted, eq, raw = assignment.partition("=")
            section, dot, key = dotted.strip().partition(".")
            if not eq or not dot or not key:
                raise InvalidOptionError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. quantize.per_channel=false")
            value = parse_value(raw)
            if section == "target" and key == "isa":  # the family, and the quantize pass's weights with it
                isa = _checked_isa(value, f"--set {assignment}")
                target = replace(target, isa=isa, **{kind: tuple(
                    s.with_option("reduce_range", reduce_range_for(isa)) if s.name == "quantize" else s
                    for s in getattr(target, kind)) for kind in ("passes", "decoder_passes")})
            elif section == "validate":  # a user's threshold holds for every model kind
                _checked_thresholds({key: value}, f"--set {assignment}")
                target = replace(target, **{kind: {**getattr(target, kind), key: value} for kind in
                                            ("validate", "decoder_validate", "decoder_validate_gguf")})
            elif section in ("provider_options", "harness", "session_options"):
                if section == "harness":
                    _checked_harness({key: value}, f"--set {assignment}")
                target = replace(target, **{section: {**getattr(target, section), key: value}})
            elif target.pass_spec(section) is not None:
                target = replace(target, **{kind: tuple(s.with_option(key, value) if s.name == section else s
                                                        for s in getattr(target, kind))
                                            for kind in ("passes", "decoder_passes")})
            else:
                names = dict.fromkeys(s.name for s in (*target.passes, *target.decoder_passes))
                known = ", ".join([*names, "validate", "provider_options", "session_options", "harness", "target.isa"])
                raise InvalidOptionError(f"--set {assignment!r}: target {target.name} has no {section!r} (known: {known})")
            target = replace(target, overrides=(*target.overrides, assignment))
        return target

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "pipeline": self.pipeline,
            "passes": [{"name": s.name, **s.options} for s in self.passes],
            "provider": self.provider,
            "isa": self.numerics_isa,
            "provider_options": self.provider_options,
            "fallback_providers": list(self.fallback_providers),
            "session_options": self.session_options,
            "validate": self.validate,
            "harness": self.harness,
            "overrides": list(self.overrides),
            **({"decoder": {"pipeline": format_pipeline(self.decoder_passes),
                            "passes": [{"name": s.name, **s.options} for s in self.decoder_passes],
                            "validate": self.decoder_validate,
                            "validate_gguf": self.decoder_validate_gguf}} if self.decoder_passes else {}),
        }


def _specs(passes: list[dict]) -> tuple[PassSpec, ...]:
    return tuple(PassSpec(p["name"], {k: v for k, v in p.items() if k != "name"}) for p in passes)


# Every metric a validator reports (optpipe/validation): each threshold names one of them, so a misspelt key fails
# instead of never being checked. max_* and perplexity_ratio are ceilings, the others floors.
METRICS = ("mean_cosine", "min_cosine", "max_abs_diff", "top1_agreement", "next_token_agreement", "perplexity",
           "perplexity_ratio", "greedy_match", "greedy_token_agreement")


def _checked_thresholds(values: dict[str, Any], origin: str) -> dict[str, Any]:
    for key, value in values.items():
        if key not in METRICS:
            raise InvalidOptionError(f"{origin}: no metric {key!r} to validate (metrics: {', '.join(METRICS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidOptionError(f"{origin}: the threshold {key} must be a number, not {value!r}")
    return dict(values)


HARNESS_KEYS = ("batch_sizes", "sequence_lengths")  # the [harness] table: the shapes `run --bench` times


def _checked_harness(values: dict[str, Any], origin: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(HARNESS_KEYS))
    if unknown:
        raise InvalidOptionError(f"{origin}: no harness setting {', '.join(unknown)} (settings: "
                                 f"{', '.join(HARNESS_KEYS)})")
    return dict(values)


def _checked_isa(value: Any, origin: str) -> str | None:
    if value is not None and value not in TARGET_ISAS:
        raise InvalidOptionError(f"{origin}: isa must be one of {', '.join(TARGET_ISAS)}, not {value!r}")
    return value


def with_isa_numerics(specs: tuple[PassSpec, ...], isa: str | None) -> tuple[PassSpec, ...]:
    """The quantize pass's `reduce_range` derived from the target's isa where the recipe does not set it."""
    if isa is None:
        return specs
    return tuple(s.with_option("reduce_range", reduce_range_for(isa))
                 if s.name == "quantize" and "reduce_range" not in s.options else s for s in specs)


def target_from_toml(data: dict, origin: str) -> Target:
    isa = _checked_isa(data.get("isa"), f"target file {origin}")
    try:
        passes = with_isa_numerics(_specs(data.get("passes", [])), isa)
        decoder = data.get("decoder", {})
        if not passes and not decoder.get("passes"):
            raise InvalidOptionError(f"target file {origin} has no [[passes]] (nor [[decoder.passes]])")
        return Target(
            name=data["name"],
            description=data.get("description", ""),
            passes=passes,
            provider=data.get("provider", "CPUExecutionProvider"),
            provider_options=dict(data.get("provider_options", {})),
            fallback_providers=tuple(data.get("fallback_providers", ())),
            session_options=dict(data.get("session_options", {})),
            validate=_checked_thresholds(data.get("validate", {}), f"target file {origin} [validate]"),
            harness=_checked_harness(data.get("harness", {}), f"target file {origin} [harness]"),
            decoder_passes=with_isa_numerics(_specs(decoder.get("passes", [])), isa),
            decoder_validate=_checked_thresholds(decoder.get("validate", {}), f"target file {origin} [decoder.validate]"),
            decoder_validate_gguf=_checked_thresholds(decoder.get("validate_gguf", {}),
                                                      f"target file {origin} [decoder.validate_gguf]"),
            isa=isa,
        )
    except (KeyError, TypeError) as exc:
        raise InvalidOptionError(f"target file {origin} is malformed: missing or wrong {exc}") from exc


def _bundled_files() -> dict[str, Any]:
    return {f.name[: -len(".toml")]: f for f in resources.files(__name__).iterdir() if f.name.endswith(".toml")}


def list_targets() -> list[Target]:
    return [load_target(name) for name in sorted(_bundled_files())]


def load_target(name_or_path: str | Path) -> Target:
    """A bundled target by name (`cpu-int8`) or a TOML file of your own."""
    text = str(name_or_path)
    bundled = _bundled_files()
    if text in bundled:
        return target_from_toml(tomllib.loads(bundled[text].read_text()), text)
    path = Path(text).expanduser()
    if text.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UnknownTargetError(f"target file {text} does not exist")
        try:
            return target_from_toml(tomllib.loads(path.read_text()), text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidOptionError(f"target file {text} is not valid TOML: {exc}") from exc
    raise UnknownTargetError(f"unknown target {text!r}; known targets: {', '.join(sorted(bundled))} (or a path to a .toml)")
