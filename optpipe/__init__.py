"""optpipe: compile a Hugging Face Transformers model into an optimized, validated ONNX artifact per target."""

from optpipe.version import __version__  # noqa: E402

from optpipe.artifact import Artifact  # noqa: E402
from optpipe.api import optimize  # noqa: E402
from optpipe.errors import OptpipeError  # noqa: E402
from optpipe.perf.harness import bench, compare  # noqa: E402
from optpipe.perf.regress import check  # noqa: E402
from optpipe.targets import list_targets, load_target  # noqa: E402
from optpipe.tune.search import tune  # noqa: E402

__all__ = ["Artifact", "OptpipeError", "bench", "check", "compare", "list_targets", "load_target", "optimize", "tune",
           "__version__"]
