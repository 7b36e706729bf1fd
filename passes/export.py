"""export: a Hugging Face model directory -> ONNX through optimum-onnx, checked by Optimum's own validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from optpipe.errors import UnsupportedModelError
from optpipe.pipeline import ModelFiles, PassContext, PassResult

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


def supported_tasks(model_type: str) -> list[str]:
    from optimum.exporters.tasks import TasksManager

    try:
        return sorted(TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx",
                                                                      library_name="transformers"))
    except KeyError:
        return []


class ExportPass:
    name = "export"
    consumes = "hf"
    produces = "onnx"
    Config = ExportConfig
    target_dependent = False

    def run(self, files: ModelFiles, config: ExportConfig, ctx: PassContext) -> PassResult:
        from optimum.exporters.onnx import main_export

        source = ctx.source
        task = _WITH_PAST.get(source.task, source.task) if config.use_past else source.task
        tasks = supported_tasks(source.model_type)
        if task not in tasks:
            raise UnsupportedModelError(
                f"unsupported model: optimum-onnx cannot export model_type {source.model_type!r} for task {task!r}"
                + (f" (it supports: {', '.join(tasks)})" if tasks else "")
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
        components = tuple(sorted(p.name for p in Path(ctx.out_dir).glob("*.onnx")))
        report = {"task": task, "components": list(components), "opset": config.opset or "optimum default",
                  "validated_by_optimum": config.do_validation, "atol": config.atol}
        return PassResult(ModelFiles(ctx.out_dir, "onnx", components), report)
