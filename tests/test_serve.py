"""`dalign serve` and the endpoint backends of the teacher and judge, on loopback ports.

Each server is started by the test that needs it, on a free port, and stopped by it.
"""
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest

from conftest import add_byte_tokenizer, write_mini_run
from dalign_jax.cli import main
from dalign_jax.config import load_config
from dalign_jax.errors import UserError

KEY = "test-key"
SERVED = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, port: int, log_path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", DALIGN_API_KEY=KEY)
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "dalign_jax.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--served-model-name", SERVED, "--max-logprobs", "256", *extra],
                            env=env, stdout=log, stderr=log)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dalign serve exited: {open(log_path).read()[-2000:]}")
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                             headers={"Authorization": f"Bearer {KEY}"})
            urllib.request.urlopen(request, timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise AssertionError("dalign serve did not come up")


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, data: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    return add_byte_tokenizer(shutil.copytree(tiny_models["llama2"][0], tmp_path_factory.mktemp("serve") / "tiny"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """(base URL, port) of a `dalign serve` over the tiny chat model, for the whole module."""
    port = free_port()
    proc = start_server(model_dir, port, tmp_path_factory.mktemp("serve_log") / "server.log")
    yield f"http://127.0.0.1:{port}/v1", port
    stop(proc)


def endpoint_yaml(url: str, **extra) -> str:
    fields = {"endpoint": url, "model": SERVED, "api_key_env": "DALIGN_TEST_KEY", **extra}
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}"


@pytest.fixture(autouse=True)
def api_key_env(monkeypatch):
    monkeypatch.setenv("DALIGN_TEST_KEY", KEY)


def served_config(tmp_path, model_dir, url: str, *, judge_extra=None, teacher=True, judge=True, **overrides):
    """The mini run with its teacher and judge at `url`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_mini_run(tmp_path, model_dir)
    text = config.read_text()
    models = [f"policy: {model_dir}"]
    if teacher:
        models.append(f"teacher: {endpoint_yaml(url, retries=1)}")
    models.append(f"judge: {endpoint_yaml(url, retries=1, **(judge_extra or {}))}" if judge else f"judge: {model_dir}")
    text = text.replace(f"models: {{policy: {model_dir}, judge: {model_dir}}}", "models: {" + ", ".join(models) + "}")
    config.write_text(text)
    return load_config(config, [f"{k}={v}" for k, v in overrides.items()]), config


def test_openai_client_lists_completes_and_streams(server):
    url, _ = server
    client = openai.OpenAI(base_url=url, api_key=KEY)
    assert [m.id for m in client.models.list().data] == [SERVED]
    messages = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=12, temperature=0)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and 0 < reply.usage.completion_tokens <= 12
    streamed = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=12, temperature=0,
                                              stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    # n samples, the same for the same seed whatever else is in the batch; another seed differs.
    sampled = [client.chat.completions.create(model=SERVED, messages=messages, max_tokens=12, n=3, seed=seed)
               for seed in (7, 7, 8)]
    texts = [[c.message.content for c in r.choices] for r in sampled]
    assert texts[0] == texts[1] != texts[2] and len(set(texts[0])) == 3
    with_logprobs = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=3, temperature=0,
                                                   logprobs=True, top_logprobs=5)
    first = with_logprobs.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 5 and first.top_logprobs[0].token == first.token  # greedy: the likeliest
    assert first.logprob == pytest.approx(first.top_logprobs[0].logprob, abs=1e-6)
    assert sum(np.exp(t.logprob) for t in first.top_logprobs) <= 1 + 1e-5


def test_more_requests_than_rows_decode_continuously_with_the_same_answers(server, model_dir, tmp_path):
    """Six requests at once on a server of two rows: one continuous call; each answer is the one the
    other server gives it alone."""
    import concurrent.futures

    url, _ = server
    messages = [[{"role": "user", "content": f"Count to {i}."}] for i in range(6)]

    def ask(base, i):
        client = openai.OpenAI(base_url=base, api_key=KEY)
        return client.chat.completions.create(model=SERVED, messages=messages[i], max_tokens=4 + 3 * i, seed=i)

    alone = [ask(url, i) for i in range(6)]
    port = free_port()
    proc = start_server(model_dir, port, tmp_path / "server.log", "--max-batch", "2", "--batch-window-ms", "300")
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda i: ask(f"http://127.0.0.1:{port}/v1", i), range(6)))
        request = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {KEY}"})
        health = json.loads(urllib.request.urlopen(request, timeout=5).read())
    finally:
        stop(proc)
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert health["rows"] == 6 and health["batches"] <= 2  # in batches of max_batch rows: 3 at least


def test_bad_requests_get_openai_errors(server):
    url, _ = server
    client = openai.OpenAI(base_url=url, api_key=KEY)
    messages = [{"role": "user", "content": "hi"}]
    for field, value in (("temperature", "hot"), ("max_tokens", 0), ("top_p", 0.0), ("n", 0)):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=SERVED, messages=messages, **{field: value})
        assert e.value.status_code == 400 and e.value.body["param"] == field and field in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED, messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="another", messages=messages)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong").models.list()


def test_judge_scores_through_the_server_equal_in_process(server, model_dir, tmp_path):
    from dalign_jax.data.spec import load_spec
    from dalign_jax.engine.judge import JudgeEngine, RemoteJudge, judge_messages, open_judge
    from dalign_jax.parallel.mesh import make_mesh

    config, _ = served_config(tmp_path / "local", model_dir, server[0], teacher=False, judge=False)
    local = JudgeEngine(config, make_mesh(-1, 1, 1))
    remote_config, _ = served_config(tmp_path / "remote", model_dir, server[0], teacher=False,
                                     judge_extra={"prefill": local.prefill, "top_logprobs": 256})
    remote = open_judge(remote_config, None)
    assert isinstance(remote, RemoteJudge) and remote.model_id == SERVED
    spec = load_spec(config.spec_dir)
    conversations = [judge_messages(spec, category, [{"role": "user", "content": f"question {i}"}], answer,
                                    cot="Analysis: AL-1 applies." if i % 2 else None, variant=i)
                     for i, (category, answer) in enumerate([("alpha", "Sure, here it is."), ("beta", "No."),
                                                              ("alpha", "I'm sorry, but I can't."), ("beta", "Yes.")])]
    np.testing.assert_allclose(remote.score(conversations), local.score(conversations), atol=1e-4)
    np.testing.assert_allclose(remote.rate(conversations, 1, 5), local.rate(conversations, 1, 5), atol=1e-4)
    np.testing.assert_array_equal(remote.classify(conversations, 3), local.classify(conversations, 3))


def read_records(directory, pattern: str) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob(pattern)) for line in f.read_text().splitlines()]


def test_distill_and_judge_stages_through_the_endpoint(server, model_dir, tmp_path):
    from dalign_jax.stages.distill import run_distill
    from dalign_jax.stages.judge import run_judge

    config, _ = served_config(tmp_path / "served", model_dir, server[0])
    assert config.distill.force_format is False  # unset: one pass for a teacher at an endpoint
    (tmp_path / "local").mkdir()
    local = load_config(write_mini_run(tmp_path / "local", model_dir), ["distill.force_format=false"])
    for c in (config, local):
        run_distill(c)
        run_judge(c)
    served_records = read_records(config.run_path / "distill", "shard-*.jsonl")
    local_records = read_records(local.run_path / "distill", "shard-*.jsonl")
    assert len(served_records) == len(local_records) == 12
    assert {r["model_id"] for r in served_records} == {SERVED}
    assert [(r["prompt_id"], r["sample"]) for r in served_records] == [(r["prompt_id"], r["sample"])
                                                                       for r in local_records]
    for served, local_record in zip(served_records, local_records):  # the same fields, of the same types
        assert sorted(served) == sorted(local_record)
        assert all(type(served[k]) is type(local_record[k]) for k in served
                   if served[k] is not None and local_record[k] is not None)
    served_scored = read_records(config.run_path / "judge", "scored-*.jsonl")
    local_scored = read_records(local.run_path / "judge", "scored-*.jsonl")
    assert [sorted(r) for r in served_scored] == [sorted(r) for r in local_scored]
    assert {r["judge_model_id"] for r in served_scored} == {SERVED}
    assert all(0 <= s <= 1 for r in served_scored if r["score"] is not None for s in r["judge_scores"])


def test_a_server_that_is_down_stops_the_stage_before_it_writes(model_dir, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    _, path = served_config(tmp_path, model_dir, url)
    for stage in ("distill", "judge"):
        assert main([stage, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dalign: error:") and "Traceback" not in err
        if stage == "distill":
            assert url in err and "models.teacher" in err
    assert not (tmp_path / "run").exists()


class Proxy:
    """Forwards to a server; on the `kill_at`-th chat request it kills the server first (a crash)."""

    def __init__(self, target_port: int, kill_at: int, server_proc):
        self.target, self.kill_at, self.server_proc, self.posts = target_port, kill_at, server_proc, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def forward(self, body=None):
                if self.command == "POST":
                    proxy.posts += 1
                    if proxy.posts == proxy.kill_at and proxy.server_proc is not None:
                        proxy.server_proc.send_signal(signal.SIGKILL)
                        proxy.server_proc.wait()
                request = urllib.request.Request(f"http://127.0.0.1:{proxy.target}{self.path}", data=body,
                                                 headers=dict(self.headers), method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=60) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                except OSError:
                    status, data = 502, b'{"error": {"message": "upstream down"}}'
                reply(self, status, data)

            def do_GET(self):
                self.forward()

            def do_POST(self):
                self.forward(self.rfile.read(int(self.headers["Content-Length"])))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_server_killed_mid_stage_then_restarted_the_stage_resumes(server, model_dir, tmp_path, capsys):
    from dalign_jax.stages.distill import run_distill

    port = free_port()
    proc = start_server(model_dir, port, tmp_path / "server.log")
    proxy = Proxy(port, kill_at=3, server_proc=proc)
    try:
        config, path = served_config(tmp_path / "crashed", model_dir, f"http://127.0.0.1:{proxy.port}/v1", judge=False)
        assert main(["distill", str(path)]) == 2  # shards 0 and 1 written, then the server died
        assert "failed after 2 tries" in capsys.readouterr().err
        written = sorted(p.name for p in (config.run_path / "distill").glob("shard-*.jsonl"))
        assert written == ["shard-00000.jsonl", "shard-00001.jsonl"]
        proc = start_server(model_dir, port, tmp_path / "server.log")
        posts = proxy.posts
        run_distill(config)
        assert proxy.posts - posts == 4  # the four shards not yet written, nothing asked twice
    finally:
        proxy.close()
        stop(proc)
    reference, _ = served_config(tmp_path / "reference", model_dir, server[0], judge=False)
    run_distill(reference)
    assert (read_records(config.run_path / "distill", "shard-*.jsonl")
            == read_records(reference.run_path / "distill", "shard-*.jsonl"))


class Stub:
    """A scripted OpenAI-compatible server: `replies` are (status, body) pairs for the chat requests in turn."""

    def __init__(self, replies):
        self.replies, self.posts = list(replies), 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body):
                reply(self, status, json.dumps(body).encode())

            def do_GET(self):
                self.send(200, {"object": "list", "data": [{"id": SERVED, "object": "model", "created": 0,
                                                            "owned_by": "stub"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                stub.posts += 1
                self.send(*stub.replies[min(stub.posts, len(stub.replies)) - 1])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def completion(logprobs=None, content="7") -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": SERVED,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "logprobs": logprobs, "finish_reason": "length"}]}


def digit_logprobs(probs: dict[str, float]) -> dict:
    alternatives = [{"token": t, "logprob": float(np.log(p)), "bytes": None} for t, p in probs.items()]
    return {"content": [dict(alternatives[0], top_logprobs=alternatives)]}


def test_a_500_is_retried_and_a_400_is_not(model_dir, tmp_path):
    from dalign_jax.engine import remote
    from dalign_jax.engine.judge import open_judge

    remote.BACKOFF_S = 0.01
    stub = Stub([(500, {"error": {"message": "busy"}}),
                 (200, completion(digit_logprobs({"3": 0.25, " 6": 0.5, "x": 0.2, "6": 0.05})))])
    try:
        config, _ = served_config(tmp_path, model_dir, stub.url, teacher=False)
        score = open_judge(config, None).score([[{"role": "user", "content": "rate"}]])
        assert stub.posts == 2
        # "3" and "6" (either spelling) renormalised over the digits: (3 x .25 + 6 x .55) / .8 / 9.
        assert score[0] == pytest.approx((3 * 0.25 + 6 * 0.55) / 0.8 / 9, abs=1e-6)
    finally:
        stub.close()
    stub = Stub([(400, {"error": {"message": "bad field", "param": "top_logprobs"}})])
    try:
        config, _ = served_config(tmp_path / "again", model_dir, stub.url, teacher=False)
        with pytest.raises(UserError, match="HTTP 400: bad field"):
            open_judge(config, None).score([[{"role": "user", "content": "rate"}]])
        assert stub.posts == 1
    finally:
        stub.close()


def test_a_reply_without_logprobs_in_score_mode_is_a_clear_error(model_dir, tmp_path):
    from dalign_jax.engine.judge import open_judge

    stub = Stub([(200, completion(None))])
    try:
        config, _ = served_config(tmp_path, model_dir, stub.url, teacher=False)
        with pytest.raises(UserError, match="no top_logprobs.*judge.mode: generate"):
            open_judge(config, None).score([[{"role": "user", "content": "rate"}]])
        generate, _ = served_config(tmp_path / "generate", model_dir, stub.url, teacher=False, **{"judge.mode": "generate"})
        assert open_judge(generate, None).score([[{"role": "user", "content": "rate"}]])[0] == 0.0  # "7": no "Score:"
    finally:
        stub.close()


@pytest.mark.parametrize("override, message", [
    ("distill.force_format=true", "distill.force_format: needs token-level control"),
    ("distill.scaffold.answer_prefix={refuse: 'No'}", "distill.scaffold.answer_prefix: needs token-level control"),
    ("models.teacher.endpoint=localhost:8000", "models.teacher.endpoint: expected an http"),
    ("models.teacher.max_concurrency=0", "models.teacher.max_concurrency: must be at least 1"),
])
def test_endpoint_settings_that_cannot_work_are_refused_at_load(model_dir, tmp_path, override, message):
    _, path = served_config(tmp_path, model_dir, "http://127.0.0.1:9/v1")
    with pytest.raises(UserError, match=message):
        load_config(path, [override])
