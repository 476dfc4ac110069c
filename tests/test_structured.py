"""Structured output: the grammar module (compile errors, mask bits, cache), the mask in
sampling, and the engine on the tiny random model: 200 keys (n=200 of one seed) at
temperature 1 per constraint, every output matching its regex, one of its choices, or
valid against its JSON schema (checked with `jsonschema`)."""

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from pgpt_jax import grammar, sampling
from pgpt_jax.engine import Engine
from pgpt_jax.request import Constraint, Delta, Limits, Request, RequestError
from pgpt_jax.tokenizer import get_tokenizer

V = 50304  # GPT-2's vocabulary padded (the tiny model's too)
EOS = 50256
TOK = get_tokenizer()

# Bounded everywhere, so that every output completes well within the tiny model's context.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -5, "maximum": 5, "multipleOf": 0.25},  # exact in binary: jsonschema checks it with floats
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "city": {"type": "string", "maxLength": 6}},
            "required": ["zip", "city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "role", "tags", "address"],
    "additionalProperties": False,
}
POINTS = {  # an array of objects, bounds on both
    "type": "array",
    "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                               "ok": {"type": "boolean"}},
              "required": ["x", "ok"], "additionalProperties": False},
    "minItems": 2, "maxItems": 4,
}
EMAIL = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
CHOICES = ["yes", "no", "maybe so", "a.b|c (d)"]  # meta characters are literal


def bits(row) -> set:
    row = np.asarray(row, np.uint32)
    return {int(w) * 32 + j for w in np.nonzero(row)[0] for j in range(32) if (int(row[w]) >> j) & 1}


# ------------------------------------------------------------------ grammar module


@pytest.mark.parametrize("kind,spec,words", [
    ("regex", "[a-", "unclosed character class"),
    ("json", {"type": "foo"}, "Invalid type"),
    ("json", {"type": "string", "format": "not-a-format"}, "Unknown format"),
    ("json", "{not json", "not valid JSON"),
    ("json", {"$ref": "#/missing"}, "does not exist"),
    ("choice", [], "non-empty list"),
    ("grammar", "start: (", ""),
    ("nope", "x", "unknown constraint kind"),
])
def test_bad_specs_raise_value_errors_with_the_engines_message(kind, spec, words):
    with pytest.raises(ValueError) as err:
        grammar.compile(kind, spec, TOK, V)
    assert words in str(err.value)


def test_masks_allow_exactly_the_grammars_next_tokens():
    m = grammar.compile("choice", ["yes", "no"], TOK, V).matcher()
    first = bits(m.mask())
    assert TOK.encode("yes")[0] in first and TOK.encode("no")[0] in first
    assert EOS not in first and TOK.encode("maybe")[0] not in first
    assert all(TOK.decode([t]) in ("y", "ye", "yes", "n", "no") for t in first)
    assert not m.can_end()
    assert m.advance(TOK.encode("yes")[0])
    assert m.can_end() and m.stopped() and bits(m.mask()) == {EOS}


def test_a_refused_token_says_so():
    m = grammar.compile("regex", "[0-9]+", TOK, V).matcher()
    assert not m.advance(TOK.encode("hello")[0])


def test_compiled_grammars_are_cached_by_spec():
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    a = grammar.compile("json", schema, TOK, V)
    before = dict(grammar.stats)
    b = grammar.compile("json", json.loads(json.dumps(schema)), TOK, V)  # an equal copy
    assert a is b and grammar.stats["cached"] == before["cached"] + 1
    assert grammar.compile("json", {**schema, "required": []}, TOK, V) is not a


# ------------------------------------------------------------------ the mask in sampling


def test_processed_logits_apply_the_mask_to_constrained_rows_only():
    rows = sampling.init_rows(2, 64)
    mask = np.zeros((2, 2), np.uint32)
    mask[:, 0] = (1 << 3) | (1 << 31)
    mask[:, 1] = 1 << 5  # token 37
    rows = rows.__class__(**{**rows.__dict__, "mask": jnp.asarray(mask), "constrained": jnp.array([True, False])})
    logits = jnp.arange(128, dtype=jnp.float32).reshape(2, 64)
    x = np.asarray(sampling.processed_logits(logits, rows))
    assert set(np.nonzero(np.isfinite(x[0]))[0]) == {3, 31, 37}
    np.testing.assert_array_equal(x[1], np.asarray(logits[1]))  # its mask is never read


# ------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def engine(tiny_model):
    limits = Limits(max_n=256, max_queue=4096, max_queued_tokens=1 << 30, max_logprobs=5)
    # One prompt bucket (the context): fewer programs to compile.
    return Engine(tiny_model, TOK, slots=64, decode_steps=4, min_bucket=128, limits=limits)


def run(engine, *requests):
    results, deltas = [None] * len(requests), [[] for _ in requests]

    def cb(i):
        def f(ev):
            (deltas[i].append if isinstance(ev, Delta) else lambda e: results.__setitem__(i, e))(ev)
        return f

    for i, r in enumerate(requests):
        engine.submit(r, cb(i))
    engine.run_until_idle()
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results, deltas


def constrained(kind, spec, **kw):
    args = dict(prompt=TOK.encode("Answer:"), max_tokens=110, temperature=1.0, n=200, seed=7)
    return Request(**{**args, **kw}, constraint=Constraint(kind, spec, "structured_outputs." + kind))


def test_200_samples_each_match_their_constraint(engine):
    results, _ = run(engine, constrained("regex", EMAIL), constrained("choice", CHOICES),
                     constrained("json", PERSON), constrained("json", POINTS))
    regex, choice, person, points = results
    for r in results:
        assert {c.finish_reason for c in r.choices} == {"stop"}, [c.text for c in r.choices if c.finish_reason != "stop"]
    assert all(re.fullmatch(EMAIL, c.text) for c in regex.choices)
    assert all(c.text in CHOICES for c in choice.choices)
    assert len({c.text for c in choice.choices}) == len(CHOICES)  # temperature 1: all of them come up
    for schema, r in ((PERSON, person), (POINTS, points)):
        for c in r.choices:
            jsonschema.validate(json.loads(c.text), schema)
        assert len({c.text for c in r.choices}) > 150  # sampled, not one forced answer


def test_any_json_object(engine):
    (r,), _ = run(engine, constrained("json_object", None, n=20))
    # Any JSON object is unbounded: those that ended are objects, the rest were cut by max_tokens.
    ended = [c for c in r.choices if c.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(c.text), dict) for c in ended)
    assert all(c.text.startswith("{") for c in r.choices)


def test_max_tokens_before_the_end_gives_length(engine):
    (r,), _ = run(engine, constrained("json", PERSON, max_tokens=5, n=8))
    assert {c.finish_reason for c in r.choices} == {"length"}
    assert all(c.text.startswith('{"name":"') and len(c.token_ids) == 5 for c in r.choices)


def test_unconstrained_neighbours_sample_what_they_sample_alone(engine):
    free = Request(prompt=TOK.encode("Once upon"), max_tokens=30, n=3, seed=11, logit_bias={EOS: -100})
    (alone,), _ = run(engine, free)
    (beside, _), _ = run(engine, free, constrained("json", PERSON, n=20))
    assert [c.token_ids for c in beside.choices] == [c.token_ids for c in alone.choices]


def test_the_host_reads_tokens_and_fills_masks_while_the_forward_runs(engine, monkeypatch):
    """A constrained step goes out in two halves: the forward first, then, while it runs, the
    host reads the tokens sampled before it and fills the masks, then the sampling."""
    events = []
    run_op, process, sample = engine.executor.run, engine._process, engine.planner.sample
    monkeypatch.setattr(engine.executor, "run", lambda op: (events.append(type(op).__name__), run_op(op))[1])
    monkeypatch.setattr(engine, "_process", lambda item: (events.append("read " + item[0]), process(item))[1])
    monkeypatch.setattr(engine.planner, "sample", lambda: (events.append("masks"), sample())[1])
    free = Request(prompt=TOK.encode("Once upon"), max_tokens=12, logit_bias={EOS: -100})
    run(engine, free, constrained("regex", EMAIL, n=3))
    assert "Decode" not in events[:events.index("Sample")]  # no multi-step call while constrained rows run
    sampled = [i for i, e in enumerate(events) if e == "Sample"]
    assert len(sampled) >= 5
    for before, i in zip(sampled, sampled[1:]):
        between = events[before + 1:i]
        forward = between.index("Forward")
        # After the forward went out: the last sampling's tokens are read, then the masks filled.
        assert "read decode" in between[forward:] and between[-1] == "masks", between
        assert "read decode" not in between[:forward], between


def test_a_seed_gives_the_same_outputs_and_best_of_ranks_matching_candidates(engine):
    req = constrained("json", POINTS, n=4, best_of=6, seed=123)
    (a,), _ = run(engine, req)
    (b,), _ = run(engine, req)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 4
    for c in a.choices:
        jsonschema.validate(json.loads(c.text), POINTS)


def test_processed_logprobs_see_the_mask_and_raw_ones_do_not(engine):
    req = constrained("regex", "abc", n=1, logprobs=1)  # one way to write it: "abc" is one token
    (raw,), _ = run(engine, req)
    req.logprobs_mode = "processed_logprobs"
    (proc,), _ = run(engine, req)
    assert raw.choices[0].text == proc.choices[0].text == "abc"
    assert max(proc.choices[0].logprobs.token_logprobs) > -1e-3  # ~0: the only token allowed
    assert min(raw.choices[0].logprobs.token_logprobs) < -1.0  # the model's own: far from certain


def test_streamed_deltas_make_the_final_text(engine):
    req = constrained("regex", EMAIL, n=3, stream=True)
    (res,), (deltas,) = run(engine, req)
    for c in res.choices:
        mine = [d for d in deltas if d.index == c.index]
        assert "".join(d.text for d in mine) == c.text and mine[-1].finish_reason == "stop"
        assert re.fullmatch(EMAIL, c.text)


def test_the_engine_refuses_a_bad_constraint_naming_its_field(engine):
    with pytest.raises(RequestError) as err:
        engine.check(Request(prompt=[1, 2], constraint=Constraint("regex", "(", "guided_regex")))
    assert err.value.param == "guided_regex" and "guided_regex" in err.value.message


# ------------------------------------------------------------------ over HTTP (last: the server runs the engine's thread)


@pytest.fixture(scope="module")
def http(engine):
    import httpx

    from server.app import create_app
    from test_server_helpers import ServerThread

    app = create_app(engine, served_model_name="tiny-test", max_body_bytes=256 * 1024)
    with ServerThread(app) as s, httpx.Client(base_url=s.base_url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("extra,param", [
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "string", "format": "no-such-format"}}}, "structured_outputs.json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs.regex"),
])
def test_bad_constraints_are_400s_naming_the_field(http, extra, param):
    from test_server_helpers import error_of

    r = http.post("/v1/completions", json={"model": "tiny-test", "prompt": "x", **extra})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_unsupported_schema_features_say_which(http):
    r = http.post("/v1/completions", json={"model": "tiny-test", "prompt": "x",
                                           "guided_json": {"type": "string", "format": "no-such-format"}})
    assert r.status_code == 400 and "no-such-format" in r.json()["error"]["message"]


def test_completions_and_chat_over_http(http):
    r = http.post("/v1/completions", json={"model": "tiny-test", "prompt": "Pick:", "n": 5, "seed": 3,
                                           "max_tokens": 100, "structured_outputs": {"json": POINTS}})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert c["finish_reason"] == "stop"
        jsonschema.validate(json.loads(c["text"]), POINTS)
    r = http.post("/v1/completions", json={"model": "tiny-test", "prompt": "Pick:", "n": 4, "seed": 3,
                                           "guided_choice": CHOICES, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    body = {"model": "tiny-test", "messages": [{"role": "user", "content": "A point?"}], "n": 3, "seed": 5,
            "max_tokens": 100, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "points", "schema": POINTS, "strict": True}}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        jsonschema.validate(json.loads(c["message"]["content"]), POINTS)
    r = http.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}, "max_tokens": 60})
    assert r.status_code == 200, r.text
    bad = http.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_schema"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format.json_schema"
