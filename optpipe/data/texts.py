"""Built-in text sets written for this project: validation texts, (distinct) calibration texts, a larger
unlabeled set that recovery after pruning trains on, and a held-out set used only for measuring fidelity in
bench/ (never for calibration, validation or training; disjoint from the other three)."""

from __future__ import annotations

from importlib import resources


def _lines(name: str) -> tuple[str, ...]:
    text = resources.files("optpipe.data").joinpath(name).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line.strip())


def validation_texts() -> tuple[str, ...]:
    return _lines("validation.txt")


def calibration_texts() -> tuple[str, ...]:
    return _lines("calibration.txt")


def unlabeled_texts() -> tuple[str, ...]:
    return _lines("unlabeled.txt")


def heldout_texts() -> tuple[str, ...]:
    return _lines("heldout.txt")
