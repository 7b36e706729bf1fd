"""The one-line text form of a pass pipeline: `export,fuse,quantize{mode=dynamic,per_channel=true}`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optpipe.errors import InvalidOptionError


@dataclass(frozen=True)
class PassSpec:
    """A pass by name with the options the recipe sets (the pass's Config supplies the rest)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def with_option(self, key: str, value: Any) -> "PassSpec":
        return PassSpec(self.name, {**self.options, key: value})


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth < 0:
                raise InvalidOptionError(f"unbalanced brackets in {text!r}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise InvalidOptionError(f"unbalanced brackets in {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_value(text: str) -> Any:
    """Parse an option value: true/false, int, float, [a,b] list, or a bare string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(item) for item in _split_top_level(inner)] if inner else []
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    return f'"{text}"' if any(c in text for c in ",{}[]=") else text


def parse_pipeline(text: str) -> list[PassSpec]:
    specs = []
    for item in _split_top_level(text):
        if not item:
            raise InvalidOptionError(f"empty pass in pipeline {text!r}")
        name, _, rest = item.partition("{")
        name = name.strip()
        options: dict[str, Any] = {}
        if rest:
            if not rest.endswith("}"):
                raise InvalidOptionError(f"pass {name!r}: options must end with '}}' in {item!r}")
            for pair in _split_top_level(rest[:-1]):
                if not pair:
                    continue
                key, eq, value = pair.partition("=")
                if not eq:
                    raise InvalidOptionError(f"pass {name!r}: option {pair!r} is not key=value")
                options[key.strip()] = parse_value(value)
        specs.append(PassSpec(name, options))
    return specs


def format_pipeline(specs: list[PassSpec] | tuple[PassSpec, ...]) -> str:
    items = []
    for spec in specs:
        if spec.options:
            opts = ",".join(f"{k}={format_value(v)}" for k, v in spec.options.items())
            items.append(f"{spec.name}{{{opts}}}")
        else:
            items.append(spec.name)
    return ",".join(items)
