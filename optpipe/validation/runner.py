"""What a per-task validator gets (optpipe/validation/validate.py hands one to each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from optpipe.passbase import ModelFiles
from optpipe.source import ModelSource


@dataclass(frozen=True)
class Runner:
    """What a per-task validator gets: the reference model dir, the ONNX files and a session factory."""

    source: ModelSource
    files: ModelFiles
    session: Callable[[Path], Any]
    texts: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[Any], None] | None = None  # gets Ticks over the texts (passbase.track)
