import pytest

from optpipe.errors import InvalidOptionError
from optpipe.targets.recipe import PassSpec, format_pipeline, parse_pipeline, parse_value


def test_parse_pipeline_with_options_and_lists():
    specs = parse_pipeline("export,fuse{flavor=gpu},quantize{mode=dynamic,per_channel=true,keep_float=[ffn_output,lm_head]}")
    assert [s.name for s in specs] == ["export", "fuse", "quantize"]
    assert specs[1].options == {"flavor": "gpu"}
    assert specs[2].options == {"mode": "dynamic", "per_channel": True, "keep_float": ["ffn_output", "lm_head"]}


def test_format_round_trips():
    text = 'export,quantize{mode=static,percentile=99.99,calibration_samples=16,exclude_nodes=["/a,b"]}'
    specs = parse_pipeline(text)
    assert parse_pipeline(format_pipeline(specs)) == specs


@pytest.mark.parametrize("raw,value", [("true", True), ("False", False), ("3", 3), ("0.5", 0.5),
                                       ("qdq", "qdq"), ("[]", []), ("'x y'", "x y")])
def test_parse_value(raw, value):
    assert parse_value(raw) == value


@pytest.mark.parametrize("bad", ["export,,fuse", "quantize{mode=dynamic", "quantize{mode}", "fuse}"])
def test_malformed_pipelines_are_rejected(bad):
    with pytest.raises(InvalidOptionError):
        parse_pipeline(bad)


def test_with_option_does_not_mutate():
    spec = PassSpec("quantize", {"mode": "dynamic"})
    changed = spec.with_option("per_channel", False)
    assert spec.options == {"mode": "dynamic"}
    assert changed.options == {"mode": "dynamic", "per_channel": False}
