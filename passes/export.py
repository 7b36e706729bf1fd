"""export: a Hugging Face model directory -> ONNX through optimum-onnx, checked by Optimum's own validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optpipe.errors import InvalidOptionError, UnsupportedModelError
from optpipe.passbase import ModelFiles, Pass, PassContext, PassResult, Report

log = logging.getLogger("optpipe.export")

# Tasks whose generator is exported with its KV cache, as Optimum names them.
_WITH_PAST = {"text-generation": "text-generation-with-past", "text2text-generation": "text2text-generation-with-past"}


@dataclass(frozen=True)
class ExportConfig:
    opset: int | None = None
    # Optimum's validation of ONNX outputs against PyTorch on its own dummy inputs.
    atol: float = 1e-4
    use_past: bool = True
    do_validation: bool = True
    # Causal LMs of the llama family: "auto" writes optpipe's fused graph (GroupQueryAttention with rotary,
    # SkipSimplifiedLayerNormalization; passes/decoder_graph.py); "optimum" uses optimum-onnx's unfused export.
    decoder: str = "auto"
    # From a GGUF source: its Q4_0 / Q4_1 / Q8_0 linear weights become MatMulNBits as they are (not re-quantized).
    gguf_blocks: bool = False
    # MatMulNBits compute for carried blocks: 4 = int8 activations, 0 = float. SmolLM2 Q4_1 -> cpu-int4, 2 threads
    # on a Xeon (AMX/VNNI), bench/llm_targets.py: level 4 decodes 2.6x faster than fp32 (CPU time per token) at
    # next-token agreement 0.960, perplexity x1.001; level 0 is exact (agreement 1.000) but 0.21x of fp32's speed.
    accuracy_level: int = 4

    def check(self) -> None:
        if self.decoder not in ("auto", "optimum"):
            raise InvalidOptionError(f"export.decoder must be 'auto' or 'optimum', not {self.decoder!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InvalidOptionError(f"export.accuracy_level must be 0 to 4, not {self.accuracy_level}")


# Optimum writes a seq2seq decoder three ways: without past, with past, and both merged behind an If node.
# ONNX Runtime's transformer optimizer does not fuse inside If subgraphs (0 fusions on a merged T5 decoder),
# so the artifact keeps the two plain decoders, which ORTModelForSeq2SeqLM loads when no merged file exists.
_UNFUSABLE_MERGED = "decoder_model_merged.onnx"


def supported_tasks(model_type: str) -> list[str]:
    # The registry is filled when the ONNX configs are imported, not by importing TasksManager alone.
    import optimum.exporters.onnx.model_configs  # noqa: F401
    from optimum.exporters.tasks import TasksManager

    try:
        return sorted(TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx",
                                                                      library_name="transformers"))
    except KeyError:
        return []


@dataclass(frozen=True)
class ExportReport(Report):
    task: str = ""
    components: tuple[str, ...] = ()
    opset: int | str = "optimum default"
    validated_by_optimum: bool = True
    atol: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)  # file -> why it is not in the artifact
    exporter: str = "optimum-onnx"
    fused_ops: dict[str, int] | None = None  # the decoder builder writes fused ops directly
    gguf_blocks: dict[str, Any] | None = None  # carried (HF name -> GGUF type) and skipped tensors with reasons
    note: str | None = None


class ExportPass(Pass):
    name = "export"
    consumes = "hf"
    produces = "onnx"
    Config = ExportConfig
    Report = ExportReport

    def call(self, files: ModelFiles, config: ExportConfig, ctx: PassContext) -> PassResult:
        from optimum.exporters.onnx import main_export

        from optpipe.passes.decoder_graph import SUPPORTED_MODEL_TYPES

        source = ctx.source
        if source.task == "text-generation" and config.decoder == "auto" and source.model_type in SUPPORTED_MODEL_TYPES:
            return _fused_decoder(files, config, ctx)
        if config.gguf_blocks and source.gguf_file is not None:
            log.warning("export.gguf_blocks: %s is exported by optimum-onnx, which cannot carry GGUF blocks; "
                        "its weights are the dequantized GGUF values", source.model_type)
        task = _WITH_PAST.get(source.task, source.task) if config.use_past else source.task
        tasks = supported_tasks(source.model_type)
        if task not in tasks:
            shown = source.task if task == source.task else f"{source.task} (exported as {task})"
            raise UnsupportedModelError(
                f"unsupported model: optimum-onnx cannot export model_type {source.model_type!r} for task {shown}"
                + (f"; for {source.model_type} it supports: {', '.join(tasks)}" if tasks
                   else "; it has no ONNX export config for this architecture")
            )
        ctx.progress(f"  exporting {source.model_type} for {task} with optimum-onnx")
        main_export(
            str(files.path),
            output=str(ctx.out_dir),
            task=task,
            opset=config.opset,
            atol=config.atol,
            do_validation=config.do_validation,
            library_name="transformers",
            local_files_only=True,
        )
        out = Path(ctx.out_dir)
        dropped = _drop_merged_decoder(out)
        components = _ordered(p.name for p in out.glob("*.onnx"))
        why = ("merged decoder (If node): ONNX Runtime's optimizer cannot fuse inside it; decoder_model.onnx + "
               "decoder_with_past_model.onnx are kept instead")
        report = ExportReport(task=task, components=components, opset=config.opset or "optimum default",
                              validated_by_optimum=config.do_validation, atol=config.atol,
                              dropped={dropped: why} if dropped else {})
        return PassResult(ModelFiles(ctx.out_dir, "onnx", components), report)


def _fused_decoder(files: ModelFiles, config: ExportConfig, ctx: PassContext) -> PassResult:
    """llama / qwen2 / mistral: optpipe's fused graph, with the GGUF's blocks carried over when asked."""
    import json

    from optpipe.passbase import copy_aux_files
    from optpipe.passes.decoder_genai import write_genai_config
    from optpipe.passes.decoder_graph import build_decoder

    source, weights, carried = ctx.source, None, None
    if not config.use_past or config.opset is not None:  # options of optimum-onnx's export, not of this builder
        asked = "use_past=false" if not config.use_past else f"opset={config.opset}"
        raise InvalidOptionError(f"export.{asked}: the fused {source.model_type} graph always has a KV cache and its "
                                 "own opset; add --set export.decoder=optimum for optimum-onnx's export")
    if config.gguf_blocks and source.gguf_file is not None:
        from optpipe.passes.gguf_blocks import gguf_weights

        layers = json.loads((files.path / "config.json").read_text())["num_hidden_layers"]
        carried = gguf_weights(source.gguf_file, source.model_type, layers)
        weights = carried.weights.get
        ctx.progress(f"  carrying {len(carried.weights)} GGUF block tensors over as MatMulNBits")
    ctx.progress(f"  writing the fused {source.model_type} graph (GroupQueryAttention, SkipSimplifiedLayerNorm)")
    built = build_decoder(files.path, ctx.out_dir / "model.onnx", weights=weights, centered_offsets=True,
                          accuracy_level=config.accuracy_level, progress=ctx.progress)
    copy_aux_files(files.path, ctx.out_dir, skip=_HF_WEIGHTS)
    write_genai_config(files.path, ctx.out_dir)
    report = ExportReport(task="text-generation-with-past", components=("model.onnx",), opset="optpipe decoder builder",
                          validated_by_optimum=False, atol=0.0, exporter="optpipe decoder builder",
                          fused_ops=dict(built.op_counts), gguf_blocks=carried.to_json() if carried else None,
                          note="; ".join(built.notes) or None)
    return PassResult(ModelFiles(ctx.out_dir, "onnx", ("model.onnx",)), report)


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _drop_merged_decoder(out: Path) -> str | None:
    merged = out / _UNFUSABLE_MERGED
    if merged.is_file() and (out / "decoder_model.onnx").is_file() and (out / "decoder_with_past_model.onnx").is_file():
        merged.unlink()
        for data in out.glob(_UNFUSABLE_MERGED + "*data"):
            data.unlink()
        return _UNFUSABLE_MERGED
    return None


def _ordered(names) -> tuple[str, ...]:
    """Encoder first, then decoders, so reports read in the order the model runs."""
    rank = {"encoder_model.onnx": 0, "model.onnx": 0, "decoder_model.onnx": 1, "decoder_with_past_model.onnx": 2}
    return tuple(sorted(names, key=lambda n: (rank.get(n, 3), n)))
