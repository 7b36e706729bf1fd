"""fuse: transformer graph fusions (attention, LayerNorm, GELU, embeddings) with ONNX Runtime's optimizer."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from optpipe.errors import InvalidOptionError
from optpipe.passbase import OnnxPass, PassContext, Report, needs_external_data, op_counts
from optpipe.passes.skip_layernorm import split_skip_layernorm

log = logging.getLogger("optpipe.fuse")

# Hugging Face model_type -> onnxruntime.transformers optimizer model_type. Encoders that share BERT's
# layer structure use the BERT fusions.
OPTIMIZER_MODEL_TYPE = {
    "bert": "bert",
    "distilbert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "electra": "bert",
    "mpnet": "bert",
    "albert": "bert",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "t5": "t5",
    "mt5": "t5",
    "bart": "bart",
    "mbart": "bart",
    "phi": "phi",
    "qwen3": "qwen3",
    "vit": "vit",
    "clip": "clip",
    "swin": "swin",
}


# Optimizer types whose fusions emit ops with no CPU kernel: on the "cpu" flavor use another type's fusions.
_CPU_SUBSTITUTE = {
    "t5": ("bert", "the t5 optimizer emits RelativePositionBias, which has only a CUDA kernel in onnxruntime; "
                   "bert fusions (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization) are used on CPU"),
}


@dataclass(frozen=True)
class FuseConfig:
    flavor: str = "cpu"  # "cpu" or "gpu": GPU fusions may use ops that only CUDA implements
    opt_level: int = 0  # 0 = fusions only, leaving a portable graph; 1/2 add ORT's own rewrites
    model_type: str | None = None  # override the optimizer model_type
    # cpu flavor: SkipLayerNormalization -> Add + Sum + LayerNormalization, 6x faster on CPU (passes/skip_layernorm.py)
    split_skip_layernorm: bool = True
    # GELU as FastGelu (tanh approximation, |error| < 5e-4): 25% less GELU time on CPU; for INT8 recipes, where it
    # is far below the quantization error. Off by default: cpu-fp32 stays exact.
    gelu_approximation: bool = False

    def check(self) -> None:
        if self.flavor not in ("cpu", "gpu"):
            raise InvalidOptionError(f"fuse.flavor must be 'cpu' or 'gpu', not {self.flavor!r}")
        if self.opt_level not in (0, 1, 2):
            raise InvalidOptionError(f"fuse.opt_level must be 0, 1 or 2 (99 is hardware-specific), not {self.opt_level}")
        for key in ("split_skip_layernorm", "gelu_approximation"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidOptionError(f"fuse.{key} must be true or false, not {getattr(self, key)!r}")


# Ops only a fusing exporter writes: a graph holding them is fused already.
PREFUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization")


@dataclass(frozen=True)
class FusedComponent(Report):
    fused: dict[str, int] = field(default_factory=dict)  # fused op type -> count
    nodes_before: int = 0
    nodes_after: int = 0
    not_fused: tuple[str, ...] = ()  # why an expected fusion did not happen
    skipped: str | None = None  # why the component was left as it was
    split_skip_layernorm: int = 0  # SkipLayerNormalization nodes split into Add + Sum + LayerNormalization


@dataclass(frozen=True)
class FuseReport(Report):
    model_type: str = "none"  # the onnxruntime optimizer type used
    flavor: str = "cpu"
    num_heads: int = 0
    hidden_size: int = 0
    components: dict[str, FusedComponent] = field(default_factory=dict)
    note: str | None = None


class FusePass(OnnxPass):
    name = "fuse"
    Config = FuseConfig
    Report = FuseReport

    @staticmethod
    def optimizer_type(config: FuseConfig, model_type: str) -> tuple[str | None, str | None]:
        """The onnxruntime optimizer type for a Hugging Face model_type, and a note when it is not the obvious one."""
        opt_type = config.model_type or OPTIMIZER_MODEL_TYPE.get(model_type)
        if config.flavor == "cpu" and opt_type in _CPU_SUBSTITUTE and config.model_type is None:
            return _CPU_SUBSTITUTE[opt_type]
        if opt_type is None:
            return None, (f"no transformer optimizer for model_type {model_type!r}: fell back to "
                          "ONNX Runtime's generic graph optimizations (constant folding, basic fusions)")
        return opt_type, None

    def transform(self, src: Path, dst: Path, config: FuseConfig, ctx: PassContext) -> FusedComponent:
        import onnx
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        opt_type, _ = self.optimizer_type(config, ctx.source.model_type)
        heads, hidden = attention_shape(src.parent)
        before = op_counts(onnx.load(str(src), load_external_data=False))
        already = {op: n for op, n in before.items() if op in PREFUSED_OPS}
        if already:  # written fused by optpipe's decoder builder: ORT's optimizer has nothing to add
            for item in (src, src.with_name(src.name + ".data")):  # the model and its external data, if any
                if item.is_file():
                    shutil.copy2(item, dst.parent / item.name)
            return FusedComponent(fused=already, nodes_before=sum(before.values()), nodes_after=sum(before.values()),
                                  skipped="already fused at export (" + ", ".join(f"{k} {v}" for k, v in
                                                                               already.items()) + ")")
        ctx.progress(f"  fusing {src.name} ({opt_type or 'generic'})")
        options = FusionOptions(opt_type or "bert")
        options.enable_gelu_approximation = config.gelu_approximation
        optimized = optimize_model(
            str(src),
            model_type=opt_type or "bert",
            optimization_options=options,
            opt_level=config.opt_level if opt_type else 1,
            use_gpu=config.flavor == "gpu",
            only_onnxruntime=opt_type is None,
            # 0 asks the optimizer to detect them from the graph, which fails on several exporters' graphs
            num_heads=heads,
            hidden_size=hidden,
        )
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        split = 0
        if config.flavor == "cpu" and config.split_skip_layernorm:
            split = split_skip_layernorm(optimized.model)
        optimized.save_model_to_file(str(dst), use_external_data_format=needs_external_data(optimized.model))
        return FusedComponent(fused=fused, nodes_before=sum(before.values()),
                              nodes_after=sum(op_counts(optimized.model).values()),
                              not_fused=tuple(_missed(before, fused, opt_type)), split_skip_layernorm=split)

    def summarize(self, components: dict[str, FusedComponent], config: FuseConfig, ctx: PassContext) -> FuseReport:
        opt_type, note = self.optimizer_type(config, ctx.source.model_type)
        if all(c.skipped for c in components.values()):
            opt_type, note = None, "the exporter wrote the graph fused; nothing left to fuse"
        heads, hidden = attention_shape(ctx.out_dir)
        return FuseReport(model_type=opt_type or "none", flavor=config.flavor, num_heads=heads, hidden_size=hidden,
                          components=components, note=note)


# config.json keys for (attention heads, hidden size) across architectures, first match wins.
_HEADS_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads")
_HIDDEN_KEYS = ("hidden_size", "n_embd", "dim", "d_model")


def attention_shape(model_dir: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) from the exported directory's config.json; (0, 0) lets ORT detect them."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0, 0
    heads = next((int(config[k]) for k in _HEADS_KEYS if isinstance(config.get(k), int)), 0)
    hidden = next((int(config[k]) for k in _HIDDEN_KEYS if isinstance(config.get(k), int)), 0)
    return heads, hidden


def _missed(before: dict[str, int], fused: dict[str, int], opt_type: str | None) -> list[str]:
    """Say why an expected fusion did not happen, not only what did."""
    if opt_type is None:
        return ["transformer fusions: no optimizer for this model type"]
    reasons = []
    has_softmax = before.get("Softmax", 0) > 0
    if has_softmax and not any(k in fused for k in ("Attention", "MultiHeadAttention", "GroupQueryAttention")):
        reasons.append("attention: the Softmax subgraph did not match any attention pattern of the "
                       f"{opt_type} optimizer")
    if before.get("LayerNormalization", 0) + before.get("ReduceMean", 0) and not any(
        "LayerNormalization" in k for k in fused
    ):
        reasons.append("layernorm: no LayerNormalization pattern matched")
    return reasons
