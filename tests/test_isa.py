"""CPU instruction-set families (optpipe/perf/isa.py): detection from faked flags, the target's isa and the
quantize pass's reduce_range derived from it, the manifest's CPU facts, and the warning on a CPU of another family.

Flags are faked with OPTPIPE_CPU_FLAGS; the kernels ONNX Runtime runs are this machine's own.
"""

from __future__ import annotations

import logging

import pytest

from optpipe import Artifact, bench, load_target, optimize
from optpipe.errors import InvalidOptionError
from optpipe.perf.isa import (ENV_FLAGS, X64_QUANT_PRECISION, detect, family_of, isa_family, normalize_flags,
                              reduce_range_for)
from optpipe.targets import target_from_toml

CPUINFO_SAPPHIRE_RAPIDS = ("fpu sse4_1 avx avx2 fma avx512f avx512bw avx512vnni avx512_vnni avx_vnni amx_tile "
                           "amx_int8 amx_bf16")


@pytest.mark.parametrize("flags, family", [
    (CPUINFO_SAPPHIRE_RAPIDS, "amx"),
    ("avx2 fma avx512f avx512bw avx512vnni", "avx512_vnni"),   # py-cpuinfo's spelling (Cascade Lake)
    ("avx2 fma avx_vnni", "avx512_vnni"),                       # AVX-VNNI without AVX-512 (Alder Lake): exact too
    ("avx2 fma avx512f avx512bw", "avx2"),                      # AVX-512 without VNNI (Skylake-SP) saturates alike
    ("avx2,fma", "avx2"),                                       # AMD Zen 2 (EPYC Rome)
    ("fp asimd asimddp i8mm", "arm_dotprod"),
    ("sse4_1 sse4_2", "other"),
    ("", "other"),
])
def test_family_from_flags(flags, family):
    assert family_of(flags) == family


def test_flags_are_normalized_to_the_integer_kernel_ones():
    assert normalize_flags("AVX2 fma avx512vnni asimddp i8mm sse2") == ("avx2", "avx512_vnni", "arm_dotprod",
                                                                          "arm_i8mm")


def test_env_fakes_the_detected_flags(monkeypatch):
    monkeypatch.setenv(ENV_FLAGS, "avx2 fma")
    cpu = detect()
    assert (cpu.family, cpu.flags, cpu.flags_from) == ("avx2", ("avx2",), ENV_FLAGS)
    assert isa_family() == "avx2"
    monkeypatch.setenv(ENV_FLAGS, CPUINFO_SAPPHIRE_RAPIDS)
    assert isa_family() == "amx"


def test_detection_without_the_override_names_this_cpu(monkeypatch):
    monkeypatch.delenv(ENV_FLAGS, raising=False)
    cpu = detect()
    assert cpu.flags_from == "py-cpuinfo" and cpu.brand and cpu.family in ("avx2", "avx512_vnni", "amx",
                                                                            "arm_dotprod", "other")


def _quantize_options(target) -> dict:
    return target.pass_spec("quantize").options


@pytest.mark.parametrize("name", ["cpu-int8", "cpu-int8-pruned", "cpu-int8-static", "cpu-sparse-int8"])
def test_bundled_int8_targets_declare_an_isa_and_derive_reduce_range(name):
    target = load_target(name)
    assert target.isa is not None
    assert _quantize_options(target)["reduce_range"] is reduce_range_for(target.isa)
    assert target.to_json()["isa"] == target.numerics_isa == target.isa


def _toml(isa: str | None, **quantize) -> dict:
    return {"name": "mine", **({"isa": isa} if isa else {}),
            "passes": [{"name": "export"}, {"name": "quantize", "mode": "dynamic", **quantize}]}


def test_reduce_range_follows_the_isa_unless_the_recipe_or_set_says_otherwise():
    assert _quantize_options(target_from_toml(_toml("portable"), "t"))["reduce_range"] is True
    assert _quantize_options(target_from_toml(_toml("avx512_vnni"), "t"))["reduce_range"] is False
    assert _quantize_options(target_from_toml(_toml("portable", reduce_range=False), "t"))["reduce_range"] is False
    undeclared = target_from_toml(_toml(None), "t")  # a TOML without isa: the pass's default (8-bit weights)
    assert "reduce_range" not in _quantize_options(undeclared) and undeclared.numerics_isa == "avx512_vnni"

    portable = target_from_toml(_toml("portable"), "t")
    overridden = portable.with_overrides(["quantize.reduce_range=false"])
    assert _quantize_options(overridden)["reduce_range"] is False and overridden.numerics_isa == "avx512_vnni"
    vnni = portable.with_overrides(["target.isa=amx"])
    assert (vnni.isa, vnni.numerics_isa, _quantize_options(vnni)["reduce_range"]) == ("amx", "amx", False)
    assert "reduce_range=true" in portable.with_pipeline("export,quantize").pipeline
    with pytest.raises(InvalidOptionError, match="isa must be one of"):
        portable.with_overrides(["target.isa=sse2"])
    with pytest.raises(InvalidOptionError, match="isa must be one of"):
        target_from_toml(_toml("avx512"), "t")


def test_targets_without_integer_gemms_hold_everywhere():
    assert load_target("cpu-fp32").numerics_isa == "portable"
    decoder = load_target("cpu-int8").for_task("text-generation")  # 8-bit weight-only MatMulNBits
    assert decoder.numerics_isa == "portable"
    assert load_target("tensorrt-int8").numerics_isa is None  # not a CPU target


@pytest.fixture(scope="module")
def vnni_on_avx2(tiny_bert_dir, tmp_path_factory):
    """A tiny BERT through cpu-int8 with 8-bit weights (isa avx512_vnni), built on a CPU faked as AVX2."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_FLAGS, "avx2 fma")
        return optimize(str(tiny_bert_dir), "cpu-int8", tmp_path_factory.mktemp("isa") / "vnni",
                        overrides=["target.isa=avx512_vnni"])


@pytest.fixture(scope="module")
def portable_here(tiny_bert_dir, tmp_path_factory):
    return optimize(str(tiny_bert_dir), "cpu-int8", tmp_path_factory.mktemp("isa") / "portable",
                    overrides=["target.isa=portable"])


def test_manifest_records_the_target_isa_and_the_validating_cpu(portable_here, monkeypatch):
    monkeypatch.delenv(ENV_FLAGS, raising=False)
    manifest = portable_here.manifest
    assert manifest["target"]["isa"] == "portable"
    cpu = manifest["validation"]["cpu"]
    assert cpu["brand"] and cpu["family"] == detect().family and cpu["flags"] == list(detect().flags)
    assert cpu["runs_target_numerics"] and cpu["note"] is None and cpu["session_options"] == {}
    assert any(p["name"] == "quantize" and p["reduce_range"] for p in manifest["target"]["passes"])


def test_a_vnni_artifact_built_on_avx2_says_so_and_validates_exact_numerics(vnni_on_avx2, capsys):
    from optpipe.cli.output import print_summary

    cpu = vnni_on_avx2.manifest["validation"]["cpu"]
    assert vnni_on_avx2.manifest["target"]["isa"] == cpu["target_isa"] == "avx512_vnni"
    assert cpu["family"] == "avx2" and not cpu["runs_target_numerics"] and cpu["validated_target_numerics"]
    assert cpu["session_options"] == {X64_QUANT_PRECISION: "1"}
    assert "avx2" in cpu["note"] and "avx512_vnni" in cpu["note"]
    print_summary(vnni_on_avx2)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("isa:"))
    assert "INT8 numerics for avx512_vnni, validated on avx2" in line and X64_QUANT_PRECISION in line


def _isa_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "optpipe" and r.levelno == logging.WARNING
            and "INT8 numerics built for" in r.getMessage()]


def test_opening_an_artifact_on_another_family_warns_once_naming_both(vnni_on_avx2, portable_here, monkeypatch,
                                                                       caplog):
    monkeypatch.setenv(ENV_FLAGS, "avx2 fma")
    with caplog.at_level(logging.WARNING, logger="optpipe"):
        Artifact.load(vnni_on_avx2.path)
    (message,) = _isa_warnings(caplog)
    assert "built for avx512_vnni (validated on avx2), this CPU is avx2" in message and "\n" not in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optpipe"):
        bench([vnni_on_avx2.path, portable_here.path], seqs=(16,), runs=2, warmup=1)
    assert len(_isa_warnings(caplog)) == 1  # the 8-bit artifact only: 7-bit weights hold on AVX2

    caplog.clear()
    monkeypatch.setenv(ENV_FLAGS, CPUINFO_SAPPHIRE_RAPIDS)  # AMX accumulates exactly, as VNNI does: no warning
    with caplog.at_level(logging.WARNING, logger="optpipe"):
        Artifact.load(vnni_on_avx2.path)
    assert _isa_warnings(caplog) == []
