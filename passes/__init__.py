"""The passes, by name. Each module holds one transformation; import them as optpipe.passes.NAME."""

from __future__ import annotations

from optpipe.passes.export import ExportPass
from optpipe.passes.fp16 import Fp16Pass
from optpipe.passes.fuse import FusePass
from optpipe.passes.prune import PrunePass
from optpipe.passes.quantize import QuantizePass
from optpipe.passes.weight_only import WeightOnlyPass

PASSES: dict[str, type] = {cls.name: cls for cls in (ExportPass, FusePass, QuantizePass, WeightOnlyPass, Fp16Pass, PrunePass)}
