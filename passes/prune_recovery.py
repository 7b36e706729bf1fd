"""Recovery after pruning, and the fidelity it is judged by: calibration activations, a least-squares refit of
each FFN down-projection, and knowledge distillation from the unpruned model on unlabeled text."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from optpipe.passes.prune_model import FFNLayer, is_conv1d, out_in

MAX_LENGTH = 128


@dataclass(frozen=True)
class TextSplit:
    """Recovery texts split into what recovery trains on and a dev part it never sees (for choosing sparsity);
    `held_out` are the validation texts, reported only, never used for a decision."""

    tune: tuple[str, ...]
    dev: tuple[str, ...]
    held_out: tuple[str, ...]


def split_texts(calibration: tuple[str, ...], held_out: tuple[str, ...],
                unlabeled: tuple[str, ...] = ()) -> TextSplit:
    """Every 4th calibration text and every 5th unlabeled text go to dev, the rest to tune."""
    dev = calibration[3::4] + unlabeled[4::5]
    tune = tuple(t for i, t in enumerate(calibration) if i % 4 != 3) + tuple(
        t for i, t in enumerate(unlabeled) if i % 5 != 4)
    return TextSplit(tune or calibration, dev or calibration, held_out)


SMALL_POOL = 200


def augmented(texts: tuple[str, ...], pairs: int = 2, seed: int = 0) -> list[str]:
    """The texts plus concatenated pairs: a few dozen short sentences give too few tokens (and contexts) to
    estimate a 1000-wide least-squares fit; pairs multiply the contexts without inventing words. Pools of
    SMALL_POOL texts or more are returned as they are (pairs would only double the cost)."""
    if len(texts) >= SMALL_POOL:
        return list(texts)
    rng = random.Random(seed)
    out = list(texts)
    for _ in range(pairs):
        order = list(texts)
        rng.shuffle(order)
        out.extend(f"{a} {b}" for a, b in zip(texts, order) if a != b)
    return out


def encode(tokenizer: Any, texts: list[str] | tuple[str, ...], batch: int = 16) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(list(texts[start:start + batch]), padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        batches.append(dict(enc))
    return batches


def _base_inputs(model: nn.Module, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import inspect

    names = set(inspect.signature(model.base_model.forward).parameters)
    return {k: v for k, v in enc.items() if k in names}


def _hidden(model: nn.Module, enc: dict[str, torch.Tensor], all_layers: bool = False):
    out = model.base_model(**_base_inputs(model, enc), output_hidden_states=all_layers)
    return out.hidden_states if all_layers else out.last_hidden_state


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def fidelity(student: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean cosine of mean-pooled last hidden states, student vs teacher (what validate.py measures on ONNX)."""
    cosines = []
    for enc in batches:
        a = _pooled(_hidden(student, enc), enc["attention_mask"])
        b = _pooled(_hidden(teacher, enc), enc["attention_mask"])
        cosines.append(nn.functional.cosine_similarity(a, b, dim=-1))
    return round(float(torch.cat(cosines).mean()), 4)


@torch.no_grad()
def ffn_activation_rms(model: nn.Module, layers: list[FFNLayer], batches) -> list[torch.Tensor]:
    """RMS over real tokens of each intermediate neuron's activation (the down-projection's input)."""
    sums = [torch.zeros(layer.width, dtype=torch.float64) for layer in layers]
    count = [0]
    current: dict[str, torch.Tensor] = {}

    def hook(index):
        def pre(_module, args):
            x = args[0][current["mask"]]
            sums[index] += (x.double() ** 2).sum(0)
        return pre

    handles = [layer.down.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for enc in batches:
            current["mask"] = enc["attention_mask"].bool()
            count[0] += int(current["mask"].sum())
            _hidden(model, enc)
    finally:
        for h in handles:
            h.remove()
    return [(s / max(count[0], 1)).sqrt().float() for s in sums]


@torch.no_grad()
def input_rms(model: nn.Module, modules: dict[str, nn.Module], batches, paths: list[str]) -> list[torch.Tensor]:
    """RMS over real tokens of each input feature of the modules at `paths` (attention output projections,
    for head scores; any Linear for activation-scaled unstructured scores)."""
    sums: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"count": 0}

    def hook(name):
        def pre(_module, args):
            x = args[0]
            if x.dim() == 3:
                x = x[state["mask"]]
            sums[name] = sums.get(name, 0) + (x.double() ** 2).sum(0)
        return pre

    handles = [modules[p].register_forward_pre_hook(hook(p)) for p in paths]
    try:
        for enc in batches:
            state["mask"] = enc["attention_mask"].bool()
            state["count"] += int(state["mask"].sum())
            _hidden(model, enc)
    finally:
        for h in handles:
            h.remove()
    return [(sums[p] / max(state["count"], 1)).sqrt().float() for p in paths]


@torch.no_grad()
def _pairs(student_down: nn.Module, teacher_down: nn.Module, student, teacher, batches):
    """(student's input to its down-projection, teacher's output of its own) over real tokens."""
    xs, ys, state = [], [], {}
    h1 = student_down.register_forward_pre_hook(lambda _m, args: xs.append(args[0][state["mask"]].double()))
    h2 = teacher_down.register_forward_hook(lambda _m, _a, out: ys.append(out[state["mask"]].double()))
    try:
        for enc in batches:
            state["mask"] = enc["attention_mask"].bool()
            _hidden(student, enc)
            _hidden(teacher, enc)
    finally:
        h1.remove()
        h2.remove()
    return torch.cat(xs), torch.cat(ys)


def reconstruction_error(student_down: nn.Module, teacher_down: nn.Module, student, teacher, batches) -> float:
    """Relative squared error of the student's down-projection output against the teacher's, same layer."""
    x, y = _pairs(student_down, teacher_down, student, teacher, batches)
    w = out_in(student_down).double()
    pred = x @ w.T + student_down.bias.double()
    return float(((pred - y) ** 2).sum() / (y ** 2).sum())


@torch.no_grad()
def refit(student: nn.Module, teacher: nn.Module, s_layers: list[FFNLayer], t_layers: list[FFNLayer], batches,
          alpha: float) -> list[dict[str, float]]:
    """Layer by layer, solve the down-projection (weight and bias) by ridge least squares so that, on the
    student's own (already pruned upstream) activations, it reproduces the unpruned layer's output; the ridge
    pulls toward the current weights because a few thousand calibration tokens underdetermine ~1000 inputs."""
    report = []
    for s, t in zip(s_layers, t_layers):
        x, y = _pairs(s.down, t.down, student, teacher, batches)
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        w0 = torch.cat([out_in(s.down).double(), s.down.bias.double()[:, None]], dim=1)  # (H, k+1)
        gram = a.T @ a
        lam = alpha * float(gram.diagonal().mean())
        before = float(((a @ w0.T - y) ** 2).sum() / (y ** 2).sum())
        w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), a.T @ y + lam * w0.T).T
        after = float(((a @ w.T - y) ** 2).sum() / (y ** 2).sum())
        weight, bias = w[:, :-1].float(), w[:, -1].float()
        s.down.weight.copy_(weight.T if is_conv1d(s.down) else weight)
        s.down.bias.copy_(bias)
        report.append({"layer": s.index, "tokens": len(x), "rel_error_before": round(before, 5),
                       "rel_error_after": round(after, 5)})
    return report


@dataclass(frozen=True)
class DistillSettings:
    steps: int
    seconds: float
    lr: float
    batch: int
    seed: int = 0


def distill(student: nn.Module, teacher: nn.Module, tokenizer: Any, texts: tuple[str, ...],
            settings: DistillSettings, progress: Callable[[str], None],
            masks: dict[nn.Module, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train the student to match the teacher's hidden states at every layer (normalized MSE) and its pooled
    output (cosine), on unlabeled text; stops at `steps` or `seconds`, whichever comes first. Dropout stays off:
    with a few hundred steps the signal is the teacher, not regularization. `masks` keep pruned weights at zero."""
    rng = random.Random(settings.seed)
    pool = augmented(texts, pairs=4, seed=settings.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    student.eval()
    teacher.eval()
    start = time.perf_counter()
    last_note = start
    steps, losses = 0, []
    while steps < settings.steps and time.perf_counter() - start < settings.seconds:
        batch = rng.sample(pool, min(settings.batch, len(pool)))
        enc = tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt")
        mask = enc["attention_mask"].bool()
        with torch.no_grad():
            target = _hidden(teacher, enc, all_layers=True)
        with torch.enable_grad():
            hidden = _hidden(student, enc, all_layers=True)
            loss = 0.0
            for h, t in zip(hidden[1:], target[1:]):
                loss = loss + ((h[mask] - t[mask]) ** 2).mean() / (t[mask] ** 2).mean()
            loss = loss / (len(hidden) - 1)
            pooled = nn.functional.cosine_similarity(_pooled(hidden[-1], enc["attention_mask"]),
                                                     _pooled(target[-1], enc["attention_mask"]), dim=-1)
            loss = loss + (1 - pooled).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if masks:
            with torch.no_grad():
                for module, keep in masks.items():
                    module.weight.mul_(keep)
        steps += 1
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if now - last_note > 15:
            progress(f"    distill step {steps}/{settings.steps}, {now - start:.0f}/{settings.seconds:.0f}s, "
                     f"loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
            last_note = now
    elapsed = time.perf_counter() - start
    return {"steps": steps, "train_seconds": round(elapsed, 1), "loss_first": round(losses[0], 5) if losses else None,
            "loss_last": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 5) if losses else None,
            "stopped_by": "steps" if steps >= settings.steps else "time"}
