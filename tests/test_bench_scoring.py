"""A smoke run of scripts/bench_scoring.py: the tiny preset, a few texts, our side only (the
peer needs torch and transformers, which are not test dependencies). It checks that the
script scores every text through the engine and reports what it measured; the benchmark's
figures themselves are in docs/benchmarks.md, never a timed test."""

import importlib.util
import json
import pathlib

from pgpt_jax.checkpoint import save_hf

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_scoring.py"


def test_a_tiny_run_scores_every_text_and_reports(tmp_path, tiny_model):
    save_hf(tiny_model, tmp_path / "tiny-seed0")  # what the script would write (init_model("tiny", seed=0))
    spec = importlib.util.spec_from_file_location("bench_scoring", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    summary = bench.main(["--preset", "tiny", "--texts", "3", "--tokens", "16", "--rounds", "1", "--path", "engine",
                          "--no-warmup", "--work-dir", str(tmp_path), "--json", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["what"] for r in rows] == ["setup", "round", "summary"]
    assert rows[0]["texts"] == 3 and rows[0]["tokens"] == 16 and rows[0]["cpu"]
    assert rows[1]["texts"] == 3 and rows[1]["pgpt_tok_s"] > 0
    assert rows[1]["positions"] == 3 * 15  # every token after a text's first has its logprob
    assert summary["pgpt_tok_s"] > 0 and "ratio" not in summary  # no peer, no ratio
    assert (tmp_path / "tiny-seed0" / "model.safetensors").exists()  # the shared weights
