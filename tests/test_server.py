"""The OpenAI-compatible HTTP front end (llmopt_lab.serving.server), over real
loopback HTTP with urllib from the standard library."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402

from llmopt_lab import Engine, generate, load_model  # noqa: E402
from llmopt_lab.serving.server import MAX_BODY_BYTES, make_server  # noqa: E402

MODEL = "llmopt-tiny"
PROMPT_IDS = [5, 17, 42, 99, 7, 13]


@pytest.fixture(scope="module")
def model_tok():
    return load_model(MODEL, device="cpu")


@pytest.fixture(scope="module")
def server(model_tok):
    model, tok = model_tok
    srv = make_server(Engine(model, tok, max_num_seqs=8), port=0, model_name=MODEL)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown_all()
    t.join(10)


def _request(url, body=None, method=None, raw=None, headers=None, timeout=60):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _json(url, body=None, **kw):
    status, _, data = _request(url, body, **kw)
    return status, json.loads(data)


def _reference(model, tok, ids, n):
    ref = generate(model, [ids], max_new_tokens=n, ignore_eos=True).tolist()[0]
    return ref, tok.decode(ref, skip_special_tokens=True)


def test_health_and_models(server):
    assert _json(server.url + "/health") == (200, {"status": "ok"})
    status, body = _json(server.url + "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert body["data"][0]["id"] == MODEL and body["data"][0]["object"] == "model"
    assert body["data"][0]["owned_by"] == "llmopt-lab"


def test_greedy_completion_matches_generate(server, model_tok):
    model, tok = model_tok
    n = 12
    ref, ref_text = _reference(model, tok, PROMPT_IDS, n)
    status, body = _json(server.url + "/v1/completions",
                         {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": n,
                          "temperature": 0, "ignore_eos": True, "some_unknown_field": 1})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["text"] == ref_text
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": n,
                             "total_tokens": len(PROMPT_IDS) + n}
    # finished requests are released: nothing left in the engine's table
    assert server.engine_loop.call(lambda e: dict(e._seqs)) == {}


def test_text_prompt(server, model_tok):
    model, tok = model_tok
    status, body = _json(server.url + "/v1/completions",
                         {"prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0,
                          "ignore_eos": True})
    assert status == 200, body
    ids = tok("def add(a, b):")["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["choices"][0]["text"] == _reference(model, tok, ids, 5)[1]


def _stream(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Transfer-Encoding"] == "chunked"
        for line in r:
            line = line.decode().rstrip("\r\n")
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    return events


def test_streaming_equals_non_streamed(server):
    body = {"prompt": PROMPT_IDS, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    _, full = _json(server.url + "/v1/completions", body)
    events = _stream(server.url + "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_concurrent_requests(server, model_tok):
    model, tok = model_tok
    prompts = [[3 + i, 10 + 2 * i, 50 + i, 7] for i in range(8)]
    n = 8
    expected = [_reference(model, tok, p, n)[1] for p in prompts]
    results = [None] * 8

    def worker(i):
        results[i] = _json(server.url + "/v1/completions",
                           {"prompt": prompts[i], "max_tokens": n, "temperature": 0,
                            "ignore_eos": True, "stream": False})

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        assert body["choices"][0]["text"] == expected[i]
        assert body["usage"]["completion_tokens"] == n
    assert len({b["id"] for _, b in results}) == 8


def test_sampled_request_with_seed_is_reproducible(server):
    body = {"prompt": PROMPT_IDS, "max_tokens": 6, "temperature": 0.8, "top_p": 0.9,
            "top_k": 20, "seed": 123, "ignore_eos": True}
    a = _json(server.url + "/v1/completions", body)[1]["choices"][0]["text"]
    b = _json(server.url + "/v1/completions", body)[1]["choices"][0]["text"]
    assert a == b


def test_chat_without_template_is_400(server):
    status, body = _json(server.url + "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400
    assert "chat template" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


BAD = [
    ({"prompt": PROMPT_IDS, "max_tokens": "ten"}, 400),
    ({"prompt": PROMPT_IDS, "temperature": "hot"}, 400),
    ({"prompt": 5}, 400),
    ({"prompt": ["a", "b"]}, 400),
    ({"prompt": []}, 400),
    ({"prompt": ""}, 400),
    ({}, 400),
    ({"prompt": PROMPT_IDS, "max_tokens": 0}, 400),
    ({"prompt": PROMPT_IDS, "max_tokens": -3}, 400),
    ({"prompt": PROMPT_IDS, "temperature": -1}, 400),
    ({"prompt": PROMPT_IDS, "top_p": 2.0}, 400),
    ({"prompt": PROMPT_IDS, "seed": "x"}, 400),
    ({"prompt": PROMPT_IDS, "stop_token_ids": ["a"]}, 400),
    ({"prompt": PROMPT_IDS, "ignore_eos": "yes"}, 400),
    ({"prompt": PROMPT_IDS, "stream": "yes"}, 400),
    ({"prompt": PROMPT_IDS, "n": 2}, 400),
    ({"prompt": PROMPT_IDS, "echo": True}, 400),
    ({"prompt": [10 ** 9]}, 400),  # outside the vocabulary
    ({"prompt": [1] * 100000, "max_tokens": 1}, 400),  # beyond the context
    ({"prompt": PROMPT_IDS, "max_tokens": 10 ** 7}, 400),  # beyond the context
    ({"prompt": PROMPT_IDS, "model": "gpt-4"}, 404),
]


@pytest.mark.parametrize("body,code", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests(server, body, code):
    status, data = _json(server.url + "/v1/completions", body)
    assert status == code, data
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    if code == 400:
        assert data["error"]["type"] == "invalid_request_error"
    assert _json(server.url + "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"null"])
def test_malformed_bodies(server, raw):
    status, _, data = _request(server.url + "/v1/completions", raw=raw, method="POST")
    assert status == 400
    assert json.loads(data)["error"]["type"] == "invalid_request_error"
    assert _json(server.url + "/health") == (200, {"status": "ok"})


def test_too_large_body_is_413(server):
    raw = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    try:
        status, _, data = _request(server.url + "/v1/completions", raw=raw, method="POST")
    except (ConnectionResetError, BrokenPipeError, urllib.error.URLError):
        status, data = 413, None  # the server may close before the body is sent
    assert status == 413
    if data is not None:
        assert "error" in json.loads(data)
    assert _json(server.url + "/health") == (200, {"status": "ok"})


def test_unknown_paths_are_404(server):
    status, body = _json(server.url + "/nope")
    assert status == 404 and "error" in body
    status, body = _json(server.url + "/v1/nope", {"a": 1})
    assert status == 404 and "error" in body
    assert _json(server.url + "/health") == (200, {"status": "ok"})


def test_serve_command_arguments():
    from llmopt_lab import cli
    from llmopt_lab.commands import serve

    assert cli.COMMANDS["serve"][0] == "llmopt_lab.commands.serve"
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    a = p.parse_args([MODEL, "--host", "0.0.0.0", "--port", "9001", "--device", "cpu",
                      "--dtype", "float32", "--policy", "dynamic", "--max-num-seqs", "4",
                      "--num-blocks", "64", "--prefix-caching"])
    assert (a.model, a.host, a.port, a.device, a.dtype, a.policy) == \
        (MODEL, "0.0.0.0", 9001, "cpu", "float32", "dynamic")
    assert (a.max_num_seqs, a.num_blocks, a.prefix_caching) == (4, 64, True)
    d = p.parse_args([MODEL])
    assert (d.host, d.port, d.prefix_caching) == ("127.0.0.1", 8000, False)


def test_shutdown_all_stops_loop_and_frees_port(model_tok):
    model, tok = model_tok
    srv = make_server(Engine(model, tok, max_num_seqs=2), port=0, model_name=MODEL)
    port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    assert _json(srv.url + "/health") == (200, {"status": "ok"})
    srv.shutdown_all()
    t.join(10)
    assert not t.is_alive()
    assert not srv.engine_loop.alive
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    srv.shutdown_all()  # twice is harmless
    # a server that never served also shuts down (no hang)
    srv2 = make_server(Engine(model, tok, max_num_seqs=2), port=0)
    srv2.shutdown_all()
    assert not srv2.engine_loop.alive


def test_serve_stops_on_keyboard_interrupt(model_tok, monkeypatch, capsys):
    from llmopt_lab.serving import server as server_mod

    model, tok = model_tok
    made = []
    real_make = server_mod.make_server

    def fake_make(*a, **kw):
        srv = real_make(*a, **kw)
        made.append(srv)

        def interrupted(poll_interval=0.5):
            raise KeyboardInterrupt

        srv.serve_forever = interrupted
        return srv

    monkeypatch.setattr(server_mod, "make_server", fake_make)
    server_mod.serve(Engine(model, tok, max_num_seqs=2), port=0)
    assert not made[0].engine_loop.alive
    out = capsys.readouterr().out
    assert "serving" in out and "stopped" in out


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_with_template(server, model_tok, monkeypatch):
    model, tok = model_tok
    monkeypatch.setattr(tok, "chat_template", CHAT_TEMPLATE, raising=False)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text)["input_ids"]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, out = _json(server.url + "/v1/chat/completions", body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert msg["content"] == _reference(model, tok, ids, 6)[1]
    assert out["usage"]["prompt_tokens"] == len(ids)
    events = _stream(server.url + "/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]
    status, out = _json(server.url + "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and "error" in out


def test_client_disconnect_aborts_stream(server):
    import time

    engine = server.engine_loop.engine
    before = engine.stats.generated_tokens
    body = json.dumps({"prompt": PROMPT_IDS, "max_tokens": 500, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection(server.server_address) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body)
        assert c.recv(200).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.engine_loop.call(lambda e: e.has_unfinished()):
        time.sleep(0.05)
    state = server.engine_loop.call(lambda e: (e.has_unfinished(), dict(e._seqs)))
    assert state == (False, {}) and server.engine_loop._queues == {}
    assert engine.stats.generated_tokens - before < 500  # aborted, not run to the end
    assert _json(server.url + "/health") == (200, {"status": "ok"})


def test_short_request_is_not_starved_by_a_long_one(server):
    done = {}

    def long_request():
        done["long"] = _json(server.url + "/v1/completions",
                             {"prompt": PROMPT_IDS, "max_tokens": 400, "ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    status, body = _json(server.url + "/v1/completions",
                         {"prompt": [9, 8, 7], "max_tokens": 2, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert "long" not in done  # answered while the long request still runs
    t.join(60)
    assert done["long"][0] == 200
    assert done["long"][1]["usage"]["completion_tokens"] == 400
