"""The one place that builds onnxruntime sessions from a target's provider settings."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from optpipe.errors import ArtifactError, InvalidOptionError, ProviderUnavailableError

log = logging.getLogger("optpipe.session")

GPU_INSTALL = "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]'"
INSTALL_HINT = {
    "CUDAExecutionProvider": f"install the GPU build: {GPU_INSTALL} (needs an NVIDIA GPU and driver; the extras "
                             "bring the CUDA and cuDNN libraries that build was made for)",
    # TensorRT's PyPI packages are stubs that fetch the real wheels from NVIDIA's index.
    "TensorrtExecutionProvider": f"install the GPU build and TensorRT 10: {GPU_INSTALL} && pip install "
                                 "--extra-index-url https://pypi.nvidia.com 'tensorrt-cu13>=10,<11' (tensorrt-cu12 "
                                 "for an onnxruntime-gpu built on CUDA 12)",
}
NEEDS = {"TensorrtExecutionProvider": "CUDAExecutionProvider"}  # TensorRT EP runs on top of CUDA's libraries


def _installed(distribution: str) -> tuple[str, Path] | None:
    """Version and site directory of an installed distribution."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    return dist.version, Path(str(dist.locate_file(""))).resolve()


def _loaded_from(ort) -> str:
    """Which distribution the imported onnxruntime module belongs to (its files are shared by both wheels)."""
    module_dir = Path(ort.__file__).resolve().parent
    for name in ("onnxruntime-gpu", "onnxruntime"):
        found = _installed(name)
        if found and module_dir.parent == found[1]:
            return name
    return "onnxruntime"


def provider_problem(provider: str) -> str | None:
    """None when a session on `provider` starts here; otherwise one line saying why not and what to install."""
    import onnxruntime as ort

    if provider_works(provider):
        return None
    hint = INSTALL_HINT.get(provider, "install an onnxruntime build that includes it")
    cpu, gpu = _installed("onnxruntime"), _installed("onnxruntime-gpu")
    if cpu and gpu and cpu[1] == gpu[1]:
        # Both wheels unpack into the same onnxruntime/ folder; whichever was installed last half-wins.
        return (f"{provider} is not available: onnxruntime {cpu[0]} and onnxruntime-gpu {gpu[0]} are both installed "
                "and overwrite each other's files; run pip uninstall -y onnxruntime onnxruntime-gpu && "
                "pip install 'onnxruntime-gpu[cuda,cudnn]'")
    if provider not in ort.get_available_providers():
        build = (f"onnxruntime-gpu {gpu[0]}" if gpu and _loaded_from(ort) == "onnxruntime-gpu"
                 else f"the CPU build of onnxruntime {ort.__version__}")
        return f"{provider} is not available on this machine ({build} is installed): {hint}"
    needed = NEEDS.get(provider)
    if needed and not provider_works(needed):
        return (f"{provider} is not available on this machine: it needs {needed}, which did not start "
                "(no NVIDIA GPU or driver, or CUDA 12/cuDNN 9 libraries missing): "
                + INSTALL_HINT["CUDAExecutionProvider"])
    return (f"{provider} is listed by onnxruntime {ort.__version__} but a session on it did not start "
            "(its GPU libraries failed to load or there is no GPU): " + hint)


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def _load_gpu_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels and TensorRT from tensorrt_libs, so no LD_LIBRARY_PATH is needed.

    onnxruntime's providers find their libraries by soname; a library already loaded with RTLD_GLOBAL counts.
    """
    import contextlib
    import ctypes
    import importlib.util
    import io

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        chatter = io.StringIO()  # preload_dlls prints its warnings; keep them in the debug log instead
        try:
            with contextlib.redirect_stdout(chatter):
                ort.preload_dlls(directory="")
        except Exception as exc:  # a partial CUDA install: the probe session below reports the outcome
            log.debug("preload_dlls failed: %s", exc)
        if chatter.getvalue().strip():
            log.debug("preload_dlls: %s", chatter.getvalue().strip())
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is None or not spec.submodule_search_locations:
        return
    libs = Path(next(iter(spec.submodule_search_locations)))
    for pattern in ("libnvinfer.so.*", "libnvinfer_plugin.so.*", "libnvonnxparser.so.*"):
        for lib in sorted(libs.glob(pattern))[:1]:
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                log.debug("could not load %s: %s", lib, exc)


@functools.lru_cache(maxsize=None)
def provider_works(provider: str) -> bool:
    """True when a session on `provider` really starts: listed providers can still fail to load their libraries."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False
    if provider == "CPUExecutionProvider":
        return True
    _load_gpu_libraries()
    try:
        session = ort.InferenceSession(_probe_model(), providers=[provider])
    except Exception as exc:  # the provider's shared libraries (CUDA, cuDNN, TensorRT) failed to load
        log.debug("provider %s failed to start: %s", provider, exc)
        return False
    return provider in session.get_providers()


def require_provider(provider: str) -> None:
    """Raise ProviderUnavailableError (exit code 4) with a one-line install hint when `provider` cannot start."""
    problem = provider_problem(provider)
    if problem:
        raise ProviderUnavailableError(problem)


PROFILE_PREFIX = "profile_file_prefix"


# How a session's idle threads wait for work (ONNX Runtime's thread pool):
#   "on"     ONNX Runtime's default: they spin, between parallel sections and for a while after Run() returns.
#   "off"    they sleep at once (allow_spinning=0). The harness default: several sessions in one process then never
#            steal cores from the one being timed, but a kernel shorter than a sleeping thread's wake-up runs on the
#            calling thread alone, which costs short (INT8, batch-1) kernels most.
#   "parked" they spin while a Run() is under way and sleep the moment it returns (force_spinning_stop=1): what a
#            deployed session does during a request, still without disturbing the next session timed.
SPINNING = ("off", "parked", "on")


def spinning_entries(spinning: str) -> dict[str, str]:
    """The session config entries of a SPINNING mode (also what onnxruntime-genai's session_options take)."""
    if spinning not in SPINNING:
        raise InvalidOptionError(f"unknown spinning mode {spinning!r}: use one of {', '.join(SPINNING)}")
    return {"off": {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"},
            "parked": {"session.force_spinning_stop": "1"}, "on": {}}[spinning]


OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                       "all": "ORT_ENABLE_ALL"}


def session_options(threads: int | None = None, spinning: str = "on", extra: dict[str, Any] | None = None):
    import onnxruntime as ort

    entries = spinning_entries(spinning)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    for key, value in (extra or {}).items():
        if key == "graph_optimization_level":
            if str(value) not in OPTIMIZATION_LEVELS:
                raise InvalidOptionError(f"session_options.graph_optimization_level: {value!r} is not one of "
                                         f"{', '.join(OPTIMIZATION_LEVELS)}")
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[str(value)])
        elif key == PROFILE_PREFIX:  # ONNX Runtime's profiler (perf/profile.py): a JSON trace per session
            options.enable_profiling = True
            options.profile_file_prefix = str(value)
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


PROFILE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")


def expand_profile_shapes(options: dict[str, Any], model_path: Path | str) -> dict[str, Any]:
    """TensorRT profiles must name every dynamic input; `*:8x128` stands for each dynamic input of rank 2.

    Targets are written once for many models (with or without token_type_ids), so they use `*`; explicit
    `name:dims` entries win over the wildcard.
    """
    if not any("*" in str(options.get(key, "")) for key in PROFILE_KEYS):
        return options
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    dynamic = [(v.name, len(v.type.tensor_type.shape.dim)) for v in graph.input if v.name not in initializers
               and any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    expanded = dict(options)
    for key in PROFILE_KEYS:
        text = str(options.get(key, ""))
        if "*" not in text:
            continue
        entries: dict[str, str] = {}
        wildcard: list[str] = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, colon, dims = item.rpartition(":")
            if not colon or not name or not all(p.isdigit() for p in dims.split("x")):
                raise InvalidOptionError(f"provider_options.{key}: {item!r} is not NAME:DxD (e.g. *:8x128)")
            if name == "*":
                wildcard.append(dims)
            else:
                entries[name] = dims
        for dims in wildcard:
            for name, rank in dynamic:
                if name not in entries and rank == len(dims.split("x")):
                    entries[name] = dims
        expanded[key] = ",".join(f"{name}:{dims}" for name, dims in entries.items())
    return expanded


def create_session(
    model_path: Path | str,
    provider: str = "CPUExecutionProvider",
    provider_options: dict[str, Any] | None = None,
    fallback_providers: tuple[str, ...] | list[str] = (),
    threads: int | None = None,
    spinning: str = "on",
    extra_options: dict[str, Any] | None = None,
    artifact_dir: Path | None = None,
):
    """An InferenceSession on `provider` (which must work here) with its fallbacks and CPU last."""
    import onnxruntime as ort

    require_provider(provider)
    options = provider_options or {}
    if Path(model_path).is_file():
        options = expand_profile_shapes(options, model_path)
    providers: list[Any] = [(provider, resolve_provider_options(options, artifact_dir))]
    for name in fallback_providers:
        if name != provider and provider_works(name):
            providers.append(name)
    if provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    sess_options = session_options(threads, spinning, extra_options)  # a bad option of ours raises its own error
    try:
        return ort.InferenceSession(str(model_path), sess_options=sess_options, providers=providers)
    except Exception as exc:
        if not Path(model_path).is_file():
            raise ArtifactError(f"model file {model_path} does not exist") from exc
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"onnxruntime cannot load {model_path}: {first}") from exc


def target_session(model_path: Path | str, target, threads: int | None = None, spinning: str = "on",
                   artifact_dir: Path | None = None):
    """A session configured as the target says."""
    return create_session(model_path, target.provider, target.provider_options, target.fallback_providers,
                          threads, spinning, target.session_options, artifact_dir)
