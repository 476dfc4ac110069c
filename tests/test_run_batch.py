"""`pgpt-jax run-batch`: a Batch API input file on the engine with no HTTP; every custom_id
once in the output (answers and errors alike); resumes from a partial output file."""

import json

import pytest

from pgpt_jax import cli
from pgpt_jax.engine import Engine
from pgpt_jax.tokenizer import get_tokenizer
from server.batch.offline import run_batch
from server.protocol import ModelInfo
from test_server import CONTEXT, MODEL, NO_EOS


def write_input(path, n: int, bad: int = -1) -> list[str]:
    ids = [f"r{i}" for i in range(n)]
    with open(path, "w") as f:
        for i, cid in enumerate(ids):
            body = {"model": MODEL, "prompt": f"line {i}", "max_tokens": 6, "seed": i, "logit_bias": NO_EOS,
                    "temperature": 9 if i == bad else 1}
            f.write(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    return ids


def read(path) -> list[dict]:
    return [json.loads(x) for x in open(path)]


@pytest.fixture(scope="module")
def engine_info(tiny_model):
    engine = Engine(tiny_model, get_tokenizer(), slots=2, decode_steps=2, min_bucket=CONTEXT)  # few shapes
    info = ModelInfo(MODEL, engine.config.vocab_size, engine.context_length, False, engine.limits, engine.tokenizer)
    yield engine, info
    engine.stop()


def test_run_batch_answers_every_line_and_resumes_from_a_partial_output(engine_info, tmp_path):
    engine, info = engine_info
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp, 7, bad=3)
    full = run_batch(engine, info, str(inp), str(out), window=3, progress=False)
    assert (full["ok"], full["failed"], full["skipped"]) == (6, 1, 0) and full["tokens"] == 36
    first = {o["custom_id"]: o for o in read(out)}
    assert sorted(first) == sorted(ids)
    assert first["r3"]["response"]["status_code"] == 400
    assert first["r3"]["response"]["body"]["error"]["param"] == "temperature"

    # A run killed after three lines, the fourth cut short mid-write: only the rest runs again.
    kept = open(out).read().splitlines(keepends=True)[:3]
    with open(out, "w") as f:
        f.writelines(kept + [kept[0][:20]])
    again = run_batch(engine, info, str(inp), str(out), window=3, progress=False)
    assert again["skipped"] == 3 and again["ok"] + again["failed"] == 4
    second = read(out)
    assert sorted(o["custom_id"] for o in second) == sorted(ids)  # each once; the torn line is gone
    texts = {o["custom_id"]: o["response"]["body"].get("choices", [{}])[0].get("text") for o in second}
    assert texts == {c: o["response"]["body"].get("choices", [{}])[0].get("text") for c, o in first.items()}


def test_run_batch_command_line(engine_info, tmp_path, capsys, monkeypatch):
    engine, _ = engine_info
    seen = {}

    def the_engine(args, mesh, limits):  # the module's engine, compiled already
        seen.update(model=args.model, slots=args.slots, max_logprobs=limits.max_logprobs)
        return engine, "the test's engine"

    monkeypatch.setattr("server.serve._engine_from_args", the_engine)
    monkeypatch.setattr(engine, "warmup", lambda progress=False: 0.0)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp, 3)
    cli.main(["run-batch", "-i", str(inp), "-o", str(out), "--model", "random:tiny", "--served-model-name", MODEL,
              "--slots", "2", "--max-logprobs", "3", "--no-progress"])
    assert seen == {"model": "random:tiny", "slots": 2, "max_logprobs": 3}
    assert sorted(o["custom_id"] for o in read(out)) == ids
    assert "3 ok, 0 failed" in capsys.readouterr().err
    with open(inp, "a") as f:
        f.write("not json\n")
    with pytest.raises(SystemExit, match="Line 4"):
        cli.main(["run-batch", "-i", str(inp), "-o", str(out), "--model", "random:tiny", "--slots", "2",
                  "--no-progress"])
