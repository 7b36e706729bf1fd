from pathlib import Path

import pytest

from optpipe.errors import InvalidOptionError, UnknownTargetError, UnsupportedModelError
from optpipe.targets import list_targets, load_target


def test_bundled_targets_load_and_have_recipes():
    names = {t.name for t in list_targets()}
    assert {"cpu-fp32", "cpu-int8"} <= names
    int8 = load_target("cpu-int8")
    assert [s.name for s in int8.passes] == ["export", "fuse", "quantize"]
    assert int8.validate["mean_cosine"] >= 0.99
    assert int8.pipeline.startswith("export,fuse")


def test_unknown_target_lists_known_ones():
    with pytest.raises(UnknownTargetError) as err:
        load_target("cpu-int3")
    assert "cpu-int8" in str(err.value) and "cpu-fp32" in str(err.value)


def test_target_from_user_toml(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\ndescription = "d"\n[[passes]]\nname = "export"\n[validate]\nmean_cosine = 0.5\n')
    target = load_target(str(path))
    assert target.name == "mine" and target.pipeline == "export"


def test_malformed_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = [unclosed\n")
    with pytest.raises(InvalidOptionError, match="not valid TOML"):
        load_target(str(path))


def test_overrides_are_applied_and_recorded():
    target = load_target("cpu-int8").with_overrides(["quantize.per_channel=false", "validate.mean_cosine=0.95"])
    assert target.pass_spec("quantize").options["per_channel"] is False
    assert target.validate["mean_cosine"] == 0.95
    assert target.overrides == ("quantize.per_channel=false", "validate.mean_cosine=0.95")
    assert "per_channel=false" in target.pipeline


@pytest.mark.parametrize("bad", ["quantize.per_channel", "nosuchpass.x=1", "per_channel=false"])
def test_bad_overrides(bad):
    with pytest.raises(InvalidOptionError):
        load_target("cpu-int8").with_overrides([bad])


KNOWN_PROVIDERS = {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
BUNDLED = sorted(p.stem for p in (Path(__file__).parents[1] / "targets").glob("*.toml"))


def test_every_bundled_toml_is_listed():
    assert sorted(t.name for t in list_targets()) == BUNDLED and len(BUNDLED) >= 8


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_target_is_a_runnable_recipe(name):
    from optpipe.passes import PASSES
    from optpipe.pipeline import Pipeline

    target = load_target(name)
    assert target.name == name and target.description
    for recipe in (target.passes, target.decoder_passes):  # every pass exists, every option is valid, order holds
        if recipe:
            Pipeline(recipe, PASSES)
            assert recipe[0].name in ("export", "prune") and any(s.name == "export" for s in recipe)
    assert target.passes or target.decoder_passes
    if target.decoder_passes:  # decoders: weight-only quantization and generation thresholds
        decoder = target.for_task("text-generation")
        assert decoder.pass_spec("quantize") is None and decoder.pass_spec("weight_only") is not None
        assert {"next_token_agreement", "perplexity_ratio"} <= set(decoder.validate)
        # a --pipeline replaces the recipe, not the decoder thresholds
        piped = target.with_pipeline("export,fuse,weight_only{bits=4}").for_task("text-generation", gguf=True)
        assert piped.pipeline.startswith("export,fuse,weight_only")
        assert piped.validate == target.for_task("text-generation", gguf=True).validate
    assert {target.provider, *target.fallback_providers} <= KNOWN_PROVIDERS
    assert (target.validate or target.decoder_validate) and all(
        0 < v <= 1 for v in target.validate.values() if isinstance(v, float))
    gpu = target.provider != "CPUExecutionProvider"
    assert gpu == name.startswith(("cuda", "tensorrt"))
    if name == "cuda-fp16":
        assert target.pass_spec("fp16") is not None
    elif name.startswith("tensorrt"):  # TensorRT picks FP16 kernels itself (trt_fp16_enable), from a float32 graph
        assert target.pass_spec("fp16") is None and target.provider_options.get("trt_fp16_enable") is True
    else:
        assert target.pass_spec("fp16") is None
    if name.startswith("tensorrt"):
        assert target.pass_spec("fuse") is None  # TensorRT fuses Q/DQ pairs itself
    if "int8" in name:
        assert target.pass_spec("quantize") is not None
    if name == "cpu-int4":
        with pytest.raises(UnsupportedModelError, match="use cpu-int8"):
            target.for_task("feature-extraction")
    assert load_target(name).to_json() == target.to_json()  # loading is deterministic
