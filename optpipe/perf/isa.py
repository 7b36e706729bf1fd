"""The CPU's instruction sets that pick ONNX Runtime's integer kernels, and so an INT8 artifact's numerics.

ONNX Runtime (MLAS) multiplies uint8 activations by int8 weights with a kernel chosen from CPUID at start-up:
- AVX2 without VNNI (and AVX-512 without VNNI): VPMADDUBSW adds each pair of u8 x s8 products in a saturating
  16-bit lane, so 255 x 127 + 255 x 127 clips at 32767. Weights of 7 bits (`quantize.reduce_range`) keep every
  pair below 255 x 64 x 2 = 32640, which is why ONNX Runtime's docs recommend reduce_range there, and only there;
- AVX-512 VNNI / AVX-VNNI (VPDPBUSD), AMX (TDPBUSD) and ARM's dot-product instructions accumulate in 32 bits,
  exactly.

A family here is such a class of numerics. `OPTPIPE_CPU_FLAGS` (space- or comma-separated flags, as
/proc/cpuinfo spells them) replaces the detected flags: tests fake a CPU this way; the kernels ONNX Runtime runs
do not change with it.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("optpipe.perf.isa")

ENV_FLAGS = "OPTPIPE_CPU_FLAGS"
# Values of a CPU target's `isa`: "portable" (and "avx2", the same numerics) quantize weights to 7 bits, which no
# x86 or ARM kernel can saturate; the others keep 8-bit weights and need a CPU that accumulates exactly.
TARGET_ISAS = ("portable", "avx2", "avx512_vnni", "amx", "arm_dotprod")
SEVEN_BIT_ISAS = frozenset({"portable", "avx2"})
EXACT_FAMILIES = frozenset({"avx512_vnni", "amx", "arm_dotprod"})
X64_QUANT_PRECISION = "session.x64quantprecision"  # ORT: u8s8 -> exact u8u8 GEMMs on x86 CPUs without VNNI

# py-cpuinfo (and /proc/cpuinfo) spell some flags two ways; ARM's are named for the canonical ones.
_ALIASES = {"avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "asimddp": "arm_dotprod", "dotprod": "arm_dotprod",
            "i8mm": "arm_i8mm", "svei8mm": "arm_i8mm"}
INTEGER_KERNEL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8",
                        "arm_dotprod", "arm_i8mm", "sve")


@dataclass(frozen=True)
class CpuIsa:
    """This CPU as far as integer kernels care: its brand, the flags that matter and its family."""

    brand: str
    flags: tuple[str, ...]
    family: str
    flags_from: str  # "py-cpuinfo" or ENV_FLAGS

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "flags": list(self.flags)}


def normalize_flags(flags: str | list[str] | tuple[str, ...] | set[str]) -> tuple[str, ...]:
    """The integer-kernel flags among `flags` (a string is split on spaces and commas), canonically named."""
    items = flags.replace(",", " ").split() if isinstance(flags, str) else flags
    names = {_ALIASES.get(f.strip().lower(), f.strip().lower()) for f in items}
    return tuple(f for f in INTEGER_KERNEL_FLAGS if f in names)


def family_of(flags: tuple[str, ...] | list[str] | str) -> str:
    """The numerics family of a CPU with `flags`: amx > avx512_vnni (AVX-512 or AVX-VNNI) > arm_dotprod > avx2.

    AVX-512 without VNNI (Skylake-SP) is "avx2": ONNX Runtime's AVX-512 core u8s8 kernel saturates alike.
    """
    names = set(normalize_flags(flags))
    if "amx_int8" in names:
        return "amx"
    if names & {"avx512_vnni", "avx_vnni"}:
        return "avx512_vnni"
    if "arm_dotprod" in names:
        return "arm_dotprod"
    if "avx2" in names:
        return "avx2"
    return "other"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """py-cpuinfo's brand and flags; it takes about a second, so once per process."""
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
    except Exception as exc:  # an unknown platform: no flags, family "other"
        log.debug("py-cpuinfo failed: %s", exc)
        info = {}
    brand = info.get("brand_raw") or platform.processor() or platform.machine()
    return brand, tuple(info.get("flags", ()))


def detect() -> CpuIsa:
    """This CPU's integer-kernel flags and family (`OPTPIPE_CPU_FLAGS` replaces the detected flags)."""
    faked = os.environ.get(ENV_FLAGS)
    if faked is not None:
        flags = normalize_flags(faked)
        return CpuIsa(f"{ENV_FLAGS}={faked}", flags, family_of(flags), ENV_FLAGS)
    brand, raw = _cpuinfo()
    flags = normalize_flags(raw)
    return CpuIsa(brand, flags, family_of(flags), "py-cpuinfo")


def isa_family() -> str:
    """"avx2" | "avx512_vnni" | "amx" | "arm_dotprod" | "other" for this CPU (`OPTPIPE_CPU_FLAGS` overrides)."""
    return detect().family


def reduce_range_for(isa: str) -> bool:
    """Whether a target built for `isa` quantizes weights to 7 bits."""
    return isa in SEVEN_BIT_ISAS


def holds_everywhere(isa: str | None) -> bool:
    """Whether numerics built for `isa` come out the same on every CPU family (7-bit weights, or no INT8 GEMM)."""
    return isa is None or isa in SEVEN_BIT_ISAS


def runs_exactly(isa: str | None, family: str) -> bool:
    """Whether a CPU of `family` computes the integer results an artifact built for `isa` was meant to have."""
    return holds_everywhere(isa) or family in EXACT_FAMILIES


def _why(family: str) -> str:
    if family == "avx2":
        return ("without VNNI its u8 x s8 products are summed in pairs in 16 bits (VPMADDUBSW) and saturate, so "
                "outputs differ from the validated ones")
    return "whether its integer kernels accumulate exactly is unknown here"


def build_note(isa: str | None, family: str) -> str | None:
    """None when a build machine of `family` validates what CPUs of `isa` compute; else the line to print."""
    if runs_exactly(isa, family):
        return None
    if family == "avx2":
        return (f"built on {family} for {isa}: this CPU's u8 x s8 kernels saturate, so validation ran with ONNX "
                f"Runtime's {X64_QUANT_PRECISION}=1 (exact u8u8 kernels), the integer results {isa} CPUs compute")
    return (f"built on {family} for {isa}: {_why(family)}; the figures may not be what {isa} CPUs compute "
            "(isa = \"portable\" holds everywhere)")


def load_warning(name: str, isa: str | None, validated: str | None, family: str) -> str | None:
    """The one-line warning for opening an artifact built for `isa` (validated on `validated`) on `family`."""
    if runs_exactly(isa, family):
        return None
    return (f"{name}: INT8 numerics built for {isa} (validated on {validated or 'an unrecorded CPU'}), this CPU is "
            f"{family}: {_why(family)}; rebuild with --set target.isa=portable, or set the ONNX Runtime session "
            f"option {X64_QUANT_PRECISION}=1 (exact, slower)")
