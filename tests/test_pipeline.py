import pytest

from optpipe import optimize
from optpipe.errors import InvalidOptionError, PipelineOrderError
from optpipe.passes import PASSES
from optpipe.pipeline import Pipeline
from optpipe.targets.recipe import parse_pipeline


def test_order_is_checked_before_any_work():
    with pytest.raises(PipelineOrderError, match="needs a 'onnx' model"):
        Pipeline(parse_pipeline("quantize,export"), PASSES)
    with pytest.raises(PipelineOrderError, match="no passes"):
        Pipeline([], PASSES)


def test_unknown_pass_and_option():
    with pytest.raises(InvalidOptionError, match="unknown pass 'compress'"):
        Pipeline(parse_pipeline("export,compress"), PASSES)
    with pytest.raises(InvalidOptionError, match="per_chanel"):
        Pipeline(parse_pipeline("export,quantize{per_chanel=true}"), PASSES)
    with pytest.raises(InvalidOptionError, match="mode"):
        Pipeline(parse_pipeline("export,quantize{mode=fancy}"), PASSES)


def test_option_values_are_checked_against_their_types():
    from optpipe.passes.quantize import QuantizePass
    from optpipe.pipeline import build_config

    # one name where a list is wanted is a list of one (not a string split into characters)
    assert build_config(QuantizePass, {"op_types": "MatMul"}).op_types == ("MatMul",)
    assert build_config(QuantizePass, {"outlier_channels": 3}).outlier_channels == 3.0
    for options, message in (({"percentile": "abc"}, "quantize.percentile must be a number"),
                             ({"per_channel": 1}, "quantize.per_channel must be true or false"),
                             ({"op_types": [1, 2]}, "quantize.op_types must be a list of names, not"),
                             ({"calibration_samples": 2.5}, "quantize.calibration_samples must be a whole number"),
                             ({"calibrate_method": "percentile"}, "calibrate_method applies to mode=static only")):
        with pytest.raises(InvalidOptionError, match=message):
            build_config(QuantizePass, options)


def test_changing_the_last_pass_reuses_the_cache(tiny_bert_dir, tmp_path, monkeypatch):
    # A cache of its own: other tests build the same model with the same override.
    monkeypatch.setenv("OPTPIPE_CACHE", str(tmp_path / "cache"))
    first = optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "a")
    second = optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "b", overrides=["quantize.per_channel=false"])
    cached = {p["name"]: p["cached"] for p in second.manifest["passes"]}
    assert cached == {"export": True, "fuse": True, "quantize": False}
    assert second.manifest["passes"][2]["config"]["per_channel"] is False
    assert first.manifest["passes"][2]["config"]["per_channel"] is True
    uncached = optimize(str(tiny_bert_dir), "cpu-int8", tmp_path / "c", use_cache=False)
    assert not any(p["cached"] for p in uncached.manifest["passes"])


def test_pipeline_text_replaces_the_recipe(tiny_bert_dir, tmp_path):
    art = optimize(str(tiny_bert_dir), "cpu-fp32", tmp_path / "p", pipeline="export,quantize{per_channel=false}")
    assert art.manifest["pipeline"] == "export,quantize{per_channel=false}"
    assert [p["name"] for p in art.manifest["passes"]] == ["export", "quantize"]
    assert art.manifest["graph"]["model.onnx"]["integer_ops"]


def test_cache_key_changes_with_the_code(monkeypatch):
    from optpipe import pipeline
    from optpipe.passes.quantize import QuantizePass

    pipe = Pipeline(parse_pipeline("export,quantize"), PASSES)
    config = pipe.steps[1][1]
    before = pipe.step_key("input", QuantizePass, config, {}, None)
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "edited")
    assert pipe.step_key("input", QuantizePass, config, {}, None) != before
