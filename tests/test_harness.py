"""optpipe bench / compare and the harness on real tiny artifacts and sessions (figures are not asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optpipe import bench, compare
from optpipe.perf.harness import interleaved_ratios, open_artifact
from optpipe.perf.inputs import token_stream, workloads
from optpipe.perf.stats import paired_ratio
from optpipe.perf.slowdown import slowed_copy
from tests.test_cli import assert_one_line_error, optpipe


@pytest.fixture(scope="module")
def tiny_fp32(tiny_bert_dir, tmp_path_factory):
    from optpipe import optimize

    return optimize(str(tiny_bert_dir), "cpu-fp32", tmp_path_factory.mktemp("harness") / "fp32").path


@pytest.fixture(scope="module")
def tiny_int8(tiny_bert_dir, tmp_path_factory):
    from optpipe import optimize

    return optimize(str(tiny_bert_dir), "cpu-int8", tmp_path_factory.mktemp("harness") / "int8").path


@pytest.fixture(scope="module")
def tiny_slow(tiny_fp32, tmp_path_factory):
    """The same model with ~170 MFLOP of injected MatMul work: several times slower at seq 64."""
    return slowed_copy(tiny_fp32, tmp_path_factory.mktemp("harness") / "slow", matmuls=40)


def test_bench_rows_have_every_figure(tiny_fp32, tiny_int8):
    result = bench([tiny_fp32, tiny_int8], [1, 2], [16], threads=1, runs=20)
    assert [(r.target, r.batch) for r in result.rows] == [("cpu-fp32", 1), ("cpu-int8", 1), ("cpu-fp32", 2),
                                                          ("cpu-int8", 2)]
    for row in result.rows:
        assert row.workload == "forward" and row.seq == 16 and row.runs == 20
        assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms
        assert row.sequences_per_s == pytest.approx(row.batch * 1e3 / row.p50_ms, rel=1e-3)
        assert row.providers[0] == "CPUExecutionProvider" and row.memory_mb >= 0
        assert row.ratio.low <= row.ratio.ratio <= row.ratio.high and row.ratio.rounds == 20
    assert result.rows[0].ratio.ratio == 1.0  # the first artifact is the reference
    assert result.machine["cores"] >= 1 and result.settings["interleaved"] and result.settings["spinning"] == "off"


def test_spinning_modes_set_the_thread_pool_as_named(tiny_fp32, tiny_int8):
    from optpipe.errors import InvalidOptionError
    from optpipe.session import create_session, session_options

    def entry(options, key):
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # ONNX Runtime: "does not have configuration with key"
            return None

    off, parked, on = (session_options(2, mode) for mode in ("off", "parked", "on"))
    assert entry(off, "session.intra_op.allow_spinning") == "0" and entry(off, "session.force_spinning_stop") is None
    assert entry(parked, "session.intra_op.allow_spinning") is None
    assert entry(parked, "session.force_spinning_stop") == "1"
    assert entry(on, "session.intra_op.allow_spinning") is None and entry(on, "session.force_spinning_stop") is None
    with pytest.raises(InvalidOptionError, match="unknown spinning mode 'fast'"):
        session_options(2, "fast")
    with pytest.raises(InvalidOptionError, match="unknown spinning mode"):  # not "onnxruntime cannot load"
        create_session(tiny_fp32 / "model.onnx", spinning="fast")
    with pytest.raises(InvalidOptionError, match="graph_optimization_level: 'max' is not one of disable, basic"):
        create_session(tiny_fp32 / "model.onnx", extra_options={"graph_optimization_level": "max"})
    result = bench([tiny_fp32, tiny_int8], [1], [16], threads=2, runs=4, spinning="parked")
    assert result.settings["spinning"] == "parked" and all(r.p50_ms > 0 for r in result.rows)
    out = optpipe("compare", str(tiny_fp32), str(tiny_int8), "--seq", "16", "--seconds", "0.5", "--spinning", "parked")
    assert out.returncode == 0 and "spinning parked" in out.stdout


def test_inputs_are_real_tokens_with_padding(tiny_fp32):
    from transformers import AutoTokenizer

    model = open_artifact(tiny_fp32, threads=1)
    [work] = workloads(tiny_fp32, model.sessions, 3, 24)
    ids, mask = work.feed["input_ids"], work.feed["attention_mask"]
    assert ids.shape == mask.shape == work.feed["token_type_ids"].shape == (3, 24)
    assert mask[0].all() and mask[1:].sum(1).min() < 24  # later rows are padded, as a batch of texts is
    assert (ids[mask == 0] == 0).all()
    text = AutoTokenizer.from_pretrained(tiny_fp32).decode(ids[0])
    assert "[UNK]" not in text and len(text.split()) > 10
    assert np.isin(ids[mask == 1], token_stream(str(tiny_fp32))).all()


def test_decoder_prefill_and_decode_are_both_measured(arch_dirs, tmp_path):
    from optpipe import optimize

    art = optimize(str(arch_dirs("gpt2")), "cpu-fp32", tmp_path / "gpt2", pipeline="export")
    model = open_artifact(art.path, threads=1)
    prefill, decode = workloads(art.path, model.sessions, 2, 12)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.feed["input_ids"].shape == (2, 12) and prefill.feed["past_key_values.0.key"].shape[2] == 0
    assert decode.feed["input_ids"].shape == (2, 1) and decode.feed["past_key_values.0.key"].shape[2] == 12
    assert decode.feed["attention_mask"].shape == (2, 13)
    rows = bench([art.path], [2], [12], threads=1, runs=3).rows
    assert [r.workload for r in rows] == ["prefill", "decode"]
    # compare times a decoder's decode step unless told otherwise, and says so; an encoder is not comparable
    assert compare(art.path, art.path, seq=12, threads=1, seconds=0.2).workload == "decode"
    assert compare(art.path, art.path, seq=12, threads=1, seconds=0.2, workload="prefill").workload == "prefill"
    out = optpipe("compare", str(art.path), str(art.path), "--seq", "12", "--seconds", "0.2")
    assert out.returncode == 0 and " decode latency (bs 1, seq 12" in out.stdout
    limit = json.loads((art.path / "config.json").read_text())["n_positions"]
    assert_one_line_error(optpipe("bench", str(art.path), "--seq", str(limit)), f"takes at most {limit} tokens")


def test_compare_refuses_models_of_different_kinds(arch_dirs, tiny_fp32, tmp_path):
    from optpipe import optimize

    art = optimize(str(arch_dirs("gpt2")), "cpu-fp32", tmp_path / "gpt2", pipeline="export")
    assert_one_line_error(optpipe("compare", str(tiny_fp32), str(art.path), "--seq", "8", "--seconds", "0.2"),
                          "run different workloads")
    usage = optpipe("bench", str(tiny_fp32), "--seconds", "0")  # argparse's usage error: exit 2
    assert usage.returncode == 2 and "argument --seconds: 0 must be > 0" in usage.stderr
    assert_one_line_error(optpipe("bench", str(tiny_fp32), "--json", str(tmp_path / "no" / "x.json")),
                          "does not exist")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_steps_through_the_kv_cache(arch_dirs, tmp_path, arch):
    """bench --new-tokens: greedy steps feed present.* back as past_key_values.*; after 3 steps the logits equal a
    fresh prefill of the prompt plus the 3 tokens (optimum's gpt2 export, and optpipe's fused llama graph)."""
    from optpipe import optimize
    from optpipe.perf.inputs import feed_for, next_step_feed

    art = optimize(str(arch_dirs(arch)), "cpu-fp32", tmp_path / arch, pipeline="export")
    model = open_artifact(art.path, threads=1)
    generate = [w for w in workloads(art.path, model.sessions, 1, 8, new_tokens=3) if w.name == "generate"]
    assert len(generate) == 1 and generate[0].new_tokens == 3
    session = model.sessions[generate[0].component]
    names = [o.name for o in session.get_outputs()]
    feed, tokens = generate[0].feed, []
    outputs = dict(zip(names, session.run(None, feed)))
    for _ in range(3):
        feed = next_step_feed(feed, outputs)
        tokens.append(int(feed["input_ids"][0, 0]))
        outputs = dict(zip(names, session.run(None, feed)))
    assert feed["attention_mask"].shape == (1, 11) and feed["past_key_values.0.key"].shape[2] == 10
    ids = np.concatenate([generate[0].feed["input_ids"], [tokens]], axis=1)
    fresh = feed_for(session, ids, np.ones_like(ids), 0, ids.shape[1], np.random.default_rng(0))
    reference = dict(zip(names, session.run(None, fresh)))["logits"][0, -1]
    assert np.abs(outputs["logits"][0, -1] - reference).max() < 1e-4
    rows = bench([art.path], [1], [8], threads=1, runs=2, new_tokens=3).rows
    assert [r.workload for r in rows] == ["prefill", "decode", "generate"] and rows[-1].p50_ms > 0


def test_interleaved_ratios_see_an_injected_slowdown(tiny_fp32, tiny_slow):
    same, slow = interleaved_ratios([tiny_fp32, tiny_fp32, tiny_slow], seq=64, threads=1, seconds=3)[1:]
    assert slow.low > 1.5 and slow.verdict() == "slower"
    assert same.low < 1.5 < slow.low
    assert compare(tiny_slow, tiny_fp32, seq=64, threads=1, seconds=2).verdict() == "faster"


def test_slowed_copy_keeps_the_outputs(tiny_fp32, tiny_slow):
    a, b = open_artifact(tiny_fp32, threads=1), open_artifact(tiny_slow, threads=1)
    [work] = workloads(tiny_fp32, a.sessions, 2, 16)
    out_a = a.sessions["model.onnx"].run(None, work.feed)[0]
    out_b = b.sessions["model.onnx"].run(None, work.feed)[0]
    assert np.array_equal(out_a, out_b)


def test_paired_ratio_interval_covers_a_known_ratio():
    rng = np.random.default_rng(1)
    drift = np.exp(rng.normal(0, 0.3, 400))  # common-mode machine drift, cancelled by pairing
    ref = 10.0 * drift * np.exp(rng.normal(0, 0.05, 400))
    other = 12.0 * drift * np.exp(rng.normal(0, 0.05, 400))
    r = paired_ratio(ref, other)
    assert r.low < 1.2 < r.high and r.high - r.low < 0.05


def test_bench_cli_table_and_json(tiny_fp32, tiny_int8, tmp_path):
    out = tmp_path / "bench.json"
    result = optpipe("bench", str(tiny_fp32), str(tiny_int8), "--batch", "1,2", "--seq", "8", "--runs", "5",
                     "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "p50 ms" in result.stdout and "fp32" in result.stdout and "1.000 [1.000, 1.000]" in result.stdout
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and data["machine"]["cpu"]


def test_compare_cli_verdict(tiny_fp32, tiny_slow):
    result = optpipe("compare", str(tiny_fp32), str(tiny_slow), "--seq", "64", "--threads", "1", "--seconds", "2")
    assert result.returncode == 0, result.stderr
    assert "verdict: slow is slower" in result.stdout and "95% interval" in result.stdout


@pytest.mark.parametrize("command", ["bench", "compare"])
def test_not_an_artifact_is_one_line(command, tiny_fp32, tmp_path):
    args = [str(tmp_path)] if command == "bench" else [str(tiny_fp32), str(tmp_path)]
    assert_one_line_error(optpipe(command, *args), "is not an optpipe artifact")


def test_bad_grid_is_one_line(tiny_fp32):
    assert_one_line_error(optpipe("bench", str(tiny_fp32), "--batch", "1,x"), "comma-separated")


def test_run_bench_records_figures_in_the_manifest(tiny_bert_dir, tmp_path):
    result = optpipe("run", str(tiny_bert_dir), "-t", "cpu-fp32", "-o", str(tmp_path / "a"), "--bench",
                     "--set", "harness.sequence_lengths=[16]")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "a" / "manifest.json").read_text())["bench"]["rows"]
    assert rows[0]["seq"] == 16 and rows[0]["p50_ms"] > 0 and rows[0]["providers"] == ["CPUExecutionProvider"]
    assert "bench (CPUExecutionProvider, forward bs 1 seq 16)" in result.stdout
