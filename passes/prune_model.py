"""What pruning does to a torch model: find the FFN/attention structure, score it, shrink it or zero weights.

Used by the prune pass (passes/prune.py). Structured pruning removes whole FFN neurons and attention heads so
the exported graph has smaller dense MatMuls; unstructured pruning zeroes scattered weights (a size win only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optpipe.errors import UnsupportedModelError

# model_type -> (path to the layer list from base_model, FFN up attr path, FFN down attr path, config key of the
# intermediate size, attention module path whose prune_heads transformers implements, or None)
_ARCH = {
    "bert": ("encoder.layer", "intermediate.dense", "output.dense", "intermediate_size", "attention"),
    "roberta": ("encoder.layer", "intermediate.dense", "output.dense", "intermediate_size", "attention"),
    "xlm-roberta": ("encoder.layer", "intermediate.dense", "output.dense", "intermediate_size", "attention"),
    "camembert": ("encoder.layer", "intermediate.dense", "output.dense", "intermediate_size", "attention"),
    "electra": ("encoder.layer", "intermediate.dense", "output.dense", "intermediate_size", "attention"),
    "distilbert": ("transformer.layer", "ffn.lin1", "ffn.lin2", "hidden_dim", "attention"),
    # GPT-2's per-layer head counts would change the KV-cache shapes Optimum derives from config.n_head
    "gpt2": ("h", "mlp.c_fc", "mlp.c_proj", "n_inner", None),
}
# Where each architecture's attention keeps its value and output projections (for head scores).
_HEAD_PARTS = {
    "distilbert": ("v_lin", "out_lin"),
}
_BERT_HEAD_PARTS = ("self.value", "output.dense")


def structured_support(model_type: str) -> None:
    if model_type not in _ARCH:
        raise UnsupportedModelError(
            f"structured pruning not supported for {model_type} (supported: {', '.join(sorted(_ARCH))}); "
            "use granularity=unstructured"
        )


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(obj, parent) if parent else obj, name, value)


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight: (in, out)
    return type(module).__name__ == "Conv1D"


def out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module's own layout."""
    return module.weight.T if is_conv1d(module) else module.weight


@dataclass
class FFNLayer:
    index: int
    layer: nn.Module
    up_path: str
    down_path: str

    @property
    def up(self) -> nn.Module:
        return _get(self.layer, self.up_path)

    @property
    def down(self) -> nn.Module:
        return _get(self.layer, self.down_path)

    @property
    def width(self) -> int:
        return out_in(self.up).shape[0]


def ffn_layers(model: nn.Module, model_type: str) -> list[FFNLayer]:
    structured_support(model_type)
    layers_path, up, down, _, _ = _ARCH[model_type]
    return [FFNLayer(i, layer, up, down) for i, layer in enumerate(_get(model.base_model, layers_path))]


def attention_modules(model: nn.Module, model_type: str) -> list[nn.Module]:
    layers_path, _, _, _, attention = _ARCH[model_type]
    if attention is None:
        raise UnsupportedModelError(
            f"attention-head pruning not supported for {model_type}: its exported KV cache assumes every layer "
            "keeps config.n_head heads; prune FFN neurons only (heads=0)"
        )
    return [_get(layer, attention) for layer in _get(model.base_model, layers_path)]


def ffn_scores(ffn: FFNLayer, act_rms: torch.Tensor | None) -> torch.Tensor:
    """Importance of each intermediate neuron: ||up row|| * ||down column||, or the RMS of its activation times
    ||down column|| (its real output contribution) when calibration activations are given."""
    down_cols = out_in(ffn.down).detach().norm(dim=0)
    if act_rms is not None:
        return act_rms * down_cols
    return out_in(ffn.up).detach().norm(dim=1) * down_cols


def shrink_ffn(ffn: FFNLayer, keep: torch.Tensor) -> None:
    """Keep only the intermediate neurons `keep` (sorted indices): up loses outputs, down loses inputs."""
    from transformers.pytorch_utils import prune_conv1d_layer, prune_linear_layer

    keep = keep.sort().values
    for path, out_side in ((ffn.up_path, True), (ffn.down_path, False)):
        module = _get(ffn.layer, path)
        if is_conv1d(module):
            new = prune_conv1d_layer(module, keep, dim=1 if out_side else 0)
        else:
            new = prune_linear_layer(module, keep, dim=0 if out_side else 1)
        _set(ffn.layer, path, new)


def set_intermediate_size(model: nn.Module, model_type: str, size: int) -> None:
    key = _ARCH[model_type][3]
    setattr(model.config, key, size)


def head_scores(model: nn.Module, model_type: str, context_rms: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Per layer, one score per remaining head: ||V_h|| * ||O_h|| (the head's output path), or the RMS of the head's
    context vectors times ||O_h|| when calibration activations are given."""
    value_path, out_path = _HEAD_PARTS.get(model_type, _BERT_HEAD_PARTS)
    scores = []
    for i, attn in enumerate(attention_modules(model, model_type)):
        heads, size = _heads_of(attn)
        value = out_in(_get(attn, value_path)).detach().reshape(heads, size, -1).flatten(1).norm(dim=1)
        out = out_in(_get(attn, out_path)).detach().reshape(-1, heads, size).permute(1, 0, 2).flatten(1).norm(dim=1)
        if context_rms is not None:
            scores.append(context_rms[i].reshape(heads, size).norm(dim=1) * out)
        else:
            scores.append(value * out)
    return scores


def _heads_of(attn: nn.Module) -> tuple[int, int]:
    inner = getattr(attn, "self", attn)
    heads = getattr(inner, "num_attention_heads", None) or getattr(inner, "n_heads")
    size = getattr(inner, "attention_head_size", None) or inner.dim // heads
    return int(heads), int(size)


def remaining_heads(attn: nn.Module) -> list[int]:
    """Original head indices still present (transformers keeps the pruned ones in attention.pruned_heads)."""
    heads, _ = _heads_of(attn)
    pruned = set(getattr(attn, "pruned_heads", set()))
    return [h for h in range(heads + len(pruned)) if h not in pruned][:heads]


def count_linear(model: nn.Module, seq: int = 128) -> dict[str, int]:
    """Parameters, and multiply-accumulates per sequence of `seq` tokens in Linear/Conv1D layers (the MatMuls that
    pruning shrinks; attention score products and embeddings are not counted)."""
    params = sum(p.numel() for p in model.parameters())
    macs = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            macs += module.weight.numel() * seq
    return {"params": int(params), "linear_macs_per_seq128": int(macs)}


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv1D modules whose weight unstructured pruning may zero: not tied to the input embeddings."""
    embed = model.get_input_embeddings()
    tied = embed.weight if embed is not None else None
    found = {}
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) or is_conv1d(module)) and module.weight is not tied:
            found[name] = module
    return found


def unstructured_masks(modules: dict[str, nn.Module], sparsity: float, scope: str, max_layer: float,
                       input_rms: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks: the smallest |w| (times the input's RMS, when given) go, per layer or under one global
    threshold, never more than `max_layer` of any one layer."""
    scores = {}
    for name, module in modules.items():
        w = out_in(module).detach().abs()
        if input_rms is not None and name in input_rms:
            w = w * input_rms[name][None, :]
        scores[name] = w
    if scope == "per_layer":
        return {name: _keep_top(s, min(sparsity, max_layer)) for name, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    total = flat.numel()
    low, high = 0.0, float(flat.max()) + 1.0
    caps = {name: int(max_layer * s.numel()) for name, s in scores.items()}
    for _ in range(60):  # bisection on the threshold: the per-layer caps make the overall sparsity non-trivial
        mid = (low + high) / 2
        pruned = sum(min(int((s < mid).sum()), caps[n]) for n, s in scores.items())
        if pruned / total < sparsity:
            low = mid
        else:
            high = mid
    masks = {}
    for name, s in scores.items():
        fraction = min(float((s < high).float().mean()), max_layer)
        masks[name] = _keep_top(s, fraction)
    return masks


def _keep_top(score: torch.Tensor, fraction: float) -> torch.Tensor:
    drop = int(round(fraction * score.numel()))
    mask = torch.ones(score.numel(), dtype=torch.bool)
    if drop:
        mask[score.flatten().argsort()[:drop]] = False
    return mask.reshape(score.shape)


def apply_masks(modules: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Zero the dropped weights in place; returns each layer's sparsity."""
    per_layer = {}
    with torch.no_grad():
        for name, module in modules.items():
            mask = masks[name].T if is_conv1d(module) else masks[name]
            module.weight.mul_(mask.to(module.weight.dtype))
            per_layer[name] = round(float((module.weight == 0).float().mean()), 4)
    return per_layer


def head_out_projections(model: nn.Module, model_type: str) -> list[nn.Module]:
    """Each layer's attention output projection, whose input is the concatenated per-head context."""
    _, out_path = _HEAD_PARTS.get(model_type, _BERT_HEAD_PARTS)
    return [_get(attn, out_path) for attn in attention_modules(model, model_type)]
