"""OpenAI's Batch API on the real engine (tiny random model): upload, create, poll, download
with the official client; per-line errors; malformed files refused naming the line; cancel;
expiry; every custom_id in exactly one output line; a line answers what the endpoint does."""

import json
import time

import httpx
import openai
import pytest

from pgpt_jax.engine import Engine
from pgpt_jax.tokenizer import get_tokenizer
from server.app import create_app
from server.batch.store import BatchStore
from test_server import CONTEXT, MODEL, NO_EOS
from test_server_helpers import ServerThread, wait_for


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    engine = Engine(tiny_model, get_tokenizer(), slots=2, decode_steps=4, min_bucket=CONTEXT)
    engine.warmup()
    app = create_app(engine, served_model_name=MODEL, batch_dir=str(tmp_path_factory.mktemp("batches")),
                     batch_window=3)
    with ServerThread(app) as s:
        s.batch_dir = app.state.pgpt.options.batch_dir
        s.http = httpx.Client(base_url=s.base_url, timeout=60)
        s.client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        s.state = app.state.pgpt
        yield s
        s.http.close()


def line(cid, body, url="/v1/completions"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def upload(srv, text: str, name="in.jsonl", purpose="batch") -> httpx.Response:
    return srv.http.post("/v1/files", files={"file": (name, text.encode())}, data={"purpose": purpose})


def wait_done(srv, batch_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = srv.http.get(f"/v1/batches/{batch_id}").json()
        if b["status"] in ("completed", "cancelled", "expired", "failed"):
            return b
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {b['status']}: {b['request_counts']}")


def read_jsonl(srv, file_id) -> list[dict]:
    if file_id is None:
        return []
    r = srv.http.get(f"/v1/files/{file_id}/content")
    assert r.status_code == 200
    return [json.loads(x) for x in r.text.splitlines()]


def test_a_batch_runs_every_line_once_through_the_official_client(srv):
    good = {"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "seed": 3, "logit_bias": NO_EOS}
    lines = [
        line("plain", good),
        line("two", {**good, "n": 2, "logprobs": 1, "temperature": 0.8}),
        line("hot", {**good, "temperature": 5}),  # a bad parameter: that line's 400, not the job's
        line("other-model", {**good, "model": "nope"}),
        line("echo", {**good, "max_tokens": 0, "echo": True, "logprobs": 0}),
    ]
    c = srv.client
    f = c.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0 and c.files.retrieve(f.id).filename == "in.jsonl"
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                         metadata={"sweep": "a"})
    assert b.status == "in_progress" and b.request_counts.total == 5 and b.metadata == {"sweep": "a"}
    done = wait_done(srv, b.id)
    assert done["status"] == "completed" and done["completed_at"] >= done["created_at"]
    assert done["request_counts"] == {"total": 5, "completed": 3, "failed": 2}
    out = [json.loads(x) for x in c.files.content(done["output_file_id"]).text.splitlines()]
    err = read_jsonl(srv, done["error_file_id"])
    assert [o["custom_id"] for o in out] == ["plain", "two", "echo"]  # line order
    assert {e["custom_id"]: e["response"]["body"]["error"]["param"] for e in err} == {
        "hot": "temperature", "other-model": "model"}
    assert all(e["response"]["status_code"] in (400, 404) and e["error"] is None for e in err)
    by_id = {o["custom_id"]: o for o in out}
    for cid, body in (("plain", good), ("two", json.loads(lines[1])["body"])):
        resp = by_id[cid]["response"]
        assert resp["status_code"] == 200 and resp["request_id"] == resp["body"]["id"]
        direct = srv.http.post("/v1/completions", json=body).json()  # the same seeded body, sent directly
        assert resp["body"]["choices"] == direct["choices"]
    assert by_id["echo"]["response"]["body"]["choices"][0]["text"] == "Once upon"
    assert b.id in [x.id for x in c.batches.list(limit=5).data]


def test_a_chat_batch(srv):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 1}
    fid = upload(srv, line("c1", body, url="/v1/chat/completions")).json()["id"]
    b = srv.http.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h"}).json()
    (out,) = read_jsonl(srv, wait_done(srv, b["id"])["output_file_id"])
    direct = srv.http.post("/v1/chat/completions", json=body).json()
    assert out["custom_id"] == "c1" and out["response"]["body"]["object"] == "chat.completion"
    assert out["response"]["body"]["choices"] == direct["choices"]


@pytest.mark.parametrize("text, where", [
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n', "Line 2"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'
     '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n', "Line 2"),
    ('{"method": "POST", "url": "/v1/completions", "body": {}}\n', "Line 1"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}\n', "Line 1"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n', "Line 1"),
    ("\n\n", "no requests"),
])
def test_a_malformed_file_is_refused_at_upload_naming_the_line(srv, text, where):
    r = upload(srv, text)
    assert r.status_code == 400 and where in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "file"


def test_bad_uploads_and_batch_requests_get_errors_naming_the_parameter(srv):
    ok = line("a", {"model": MODEL, "prompt": "x", "max_tokens": 1}) + "\n"
    assert upload(srv, ok, purpose="fine-tune").json()["error"]["param"] == "purpose"
    assert srv.http.post("/v1/files", json={"purpose": "batch"}).status_code == 415
    fid = upload(srv, ok).json()["id"]
    for body, param in (({"input_file_id": fid, "endpoint": "/v1/embeddings", "completion_window": "24h"}, "endpoint"),
                        ({"input_file_id": fid, "endpoint": "/v1/completions", "completion_window": "soon"},
                         "completion_window"),
                        ({"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "24h"},
                         "input_file_id"),
                        ({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                         "input_file_id")):  # its line's url is not the batch's endpoint
        r = srv.http.post("/v1/batches", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    assert srv.http.get("/v1/batches/batch_nope").status_code == 404
    assert srv.http.get("/v1/files/file-nope/content").status_code == 404
    assert srv.http.delete(f"/v1/files/{fid}").json()["deleted"] is True
    assert srv.http.get(f"/v1/files/{fid}").status_code == 404


def test_cancel_ends_every_line_exactly_once(srv):
    long = {"model": MODEL, "prompt": "a", "max_tokens": 60, "logit_bias": NO_EOS}
    fid = upload(srv, "\n".join(line(f"r{i}", long) for i in range(12))).json()["id"]
    b = srv.http.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/completions",
                                           "completion_window": "24h"}).json()
    assert srv.state.batch_runner is not None
    time.sleep(0.3)
    r = srv.http.post(f"/v1/batches/{b['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    done = wait_done(srv, b["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    out, err = read_jsonl(srv, done["output_file_id"]), read_jsonl(srv, done["error_file_id"])
    assert sorted(o["custom_id"] for o in out + err) == sorted(f"r{i}" for i in range(12))
    assert err and all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in err)
    assert done["request_counts"]["completed"] == len(out)
    assert srv.http.post(f"/v1/batches/{b['id']}/cancel").status_code == 200  # cancelled already: same object
    assert srv.state.batch_runner.in_flight == 0
    # an abort is a mark the engine acts on at its next step: the slots free soon after, not at once
    assert wait_for(lambda: srv.state.engine.active_slots == 0), srv.state.engine.active_slots


def test_interactive_requests_go_first_while_a_batch_runs(srv):
    # Lines as long as the context: none ends (freeing a slot) in the moment the test looks.
    long = {"model": MODEL, "prompt": "b", "max_tokens": CONTEXT - 2, "logit_bias": NO_EOS}
    # Enough lines for seconds of work on a fast CPU too (30 took under 2 s on a Zen 5, over
    # before the batch held both slots while an earlier interactive need was still held).
    fid = upload(srv, "\n".join(line(f"q{i}", long) for i in range(150))).json()["id"]
    b = srv.http.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/completions",
                                           "completion_window": "24h"}).json()
    eng = srv.state.engine
    deadline = time.monotonic() + 60
    while eng.active_slots < 2:  # the batch holds both slots
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yields = eng.batch_yields
    r = srv.http.post("/v1/completions", json={"model": MODEL, "prompt": "c", "max_tokens": 2})
    assert r.status_code == 200 and eng.batch_yields > yields
    metrics = srv.http.get("/metrics").text
    assert "pgpt_engine_batch_yields" in metrics and "pgpt_batch_lines_in_flight" in metrics
    assert wait_done(srv, b["id"])["request_counts"]["completed"] == 150


def test_an_expired_batch_ends_its_unrun_lines(srv):
    body = {"model": MODEL, "prompt": "a", "max_tokens": 60, "logit_bias": NO_EOS}
    fid = upload(srv, "\n".join(line(f"e{i}", body) for i in range(8))).json()["id"]
    srv.state.batch_runner.pause()  # hold the lines back while the window closes
    try:
        b = srv.http.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/completions",
                                               "completion_window": "24h"}).json()
        store: BatchStore = srv.state.batches
        store._write([("UPDATE batches SET expires_at = ? WHERE id = ?", (int(time.time()) - 1, b["id"]))])
    finally:
        srv.state.batch_runner.resume()
    done = wait_done(srv, b["id"])
    assert done["status"] == "expired" and done["output_file_id"] is None
    err = read_jsonl(srv, done["error_file_id"])
    assert sorted(e["custom_id"] for e in err) == sorted(f"e{i}" for i in range(8))
    assert all(e["error"]["code"] == "batch_expired" for e in err)


def test_one_server_per_batch_directory(srv):
    # A second server on the same directory would run the same lines: it serves without the Batch API.
    other = create_app(served_model_name=MODEL, loader=lambda: None, batch_dir=srv.batch_dir)
    assert other.state.pgpt.batches is None
    assert all(getattr(r, "path", "") != "/v1/batches" for r in other.routes)
