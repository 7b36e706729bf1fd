"""The one place that builds onnxruntime sessions from a target's provider settings."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from optpipe.errors import ArtifactError, ProviderUnavailableError

log = logging.getLogger("optpipe.session")

INSTALL_HINT = {
    "CUDAExecutionProvider": "install the GPU build: pip uninstall -y onnxruntime && pip install onnxruntime-gpu "
                             "(needs an NVIDIA GPU with CUDA 12 and cuDNN 9)",
    "TensorrtExecutionProvider": "install onnxruntime-gpu and TensorRT (pip install tensorrt) on a machine with an "
                                 "NVIDIA GPU",
}


def _probe_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString()


@functools.lru_cache(maxsize=None)
def provider_works(provider: str) -> bool:
    """True when a session on `provider` really starts: listed providers can still fail to load their libraries."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False
    if provider == "CPUExecutionProvider":
        return True
    try:
        session = ort.InferenceSession(_probe_model(), providers=[provider])
    except Exception as exc:  # the provider's shared libraries (CUDA, cuDNN, TensorRT) failed to load
        log.debug("provider %s failed to start: %s", provider, exc)
        return False
    return provider in session.get_providers()


def require_provider(provider: str) -> None:
    if not provider_works(provider):
        hint = INSTALL_HINT.get(provider, "install an onnxruntime build that includes it")
        raise ProviderUnavailableError(f"{provider} is not available on this machine: {hint}")


def session_options(threads: int | None = None, spinning: bool = True, extra: dict[str, Any] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        # Idle sessions' spinning threads steal cores from the session being measured.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    for key, value in (extra or {}).items():
        if key == "graph_optimization_level":
            level = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                     "all": "ORT_ENABLE_ALL"}[str(value)]
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        else:
            options.add_session_config_entry(str(key), str(value))
    return options


def resolve_provider_options(options: dict[str, Any], artifact_dir: Path | None) -> dict[str, str]:
    """Provider options as ORT wants them (strings); relative cache paths are resolved inside the artifact."""
    resolved = {}
    for key, value in options.items():
        if key.endswith("_path") and artifact_dir is not None and not Path(str(value)).is_absolute():
            path = artifact_dir / str(value)
            path.mkdir(parents=True, exist_ok=True)
            value = str(path)
        resolved[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return resolved


def create_session(
    model_path: Path | str,
    provider: str = "CPUExecutionProvider",
    provider_options: dict[str, Any] | None = None,
    fallback_providers: tuple[str, ...] | list[str] = (),
    threads: int | None = None,
    spinning: bool = True,
    extra_options: dict[str, Any] | None = None,
    artifact_dir: Path | None = None,
):
    """An InferenceSession on `provider` (which must work here) with its fallbacks and CPU last."""
    import onnxruntime as ort

    require_provider(provider)
    providers: list[Any] = [(provider, resolve_provider_options(provider_options or {}, artifact_dir))]
    for name in fallback_providers:
        if name != provider and provider_works(name):
            providers.append(name)
    if provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    try:
        return ort.InferenceSession(str(model_path), sess_options=session_options(threads, spinning, extra_options),
                                    providers=providers)
    except Exception as exc:
        if not Path(model_path).is_file():
            raise ArtifactError(f"model file {model_path} does not exist") from exc
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"onnxruntime cannot load {model_path}: {first}") from exc


def target_session(model_path: Path | str, target, threads: int | None = None, spinning: bool = True,
                   artifact_dir: Path | None = None):
    """A session configured as the target says."""
    return create_session(model_path, target.provider, target.provider_options, target.fallback_providers,
                          threads, spinning, target.session_options, artifact_dir)
