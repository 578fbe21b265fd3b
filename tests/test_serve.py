"""`specexec serve` tested as a user would: a real server in a subprocess on 127.0.0.1, the official
`openai` client and raw HTTP (httpx), tiny random models in folders (no download).

Greedy answers must equal `specexec generate` of the same prompt alone, concurrent or not; a seeded
sampled answer must repeat. Every request loop here is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import save_tiny_cli_pair

from specexec_cli.cli import main

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")
STARTUP_S = 120
PROMPTS = ["w1 w2 w3", "w7", "w9 w9 w10 w11 w12 w13", "w20 w30", "w5 w6 w7 w8", "w100"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny float32 Llama target and draft with a word-level tokenizer and a chat template."""
    root = tmp_path_factory.mktemp("serve_models")
    save_tiny_cli_pair(root, positions=512, chat_template=CHAT_TEMPLATE)
    return root


class Server:
    """`specexec serve` in a subprocess on a free loopback port."""

    def __init__(self, models: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "specexec_cli", "serve", "-t", str(models / "target"), "-d",
                   str(models / "draft"), "--port", "0", "--served-model-name", "tiny", *flags]
        self.stderr_lines: list[str] = []
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.port = None
        found = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.stderr_lines.append(line)
                match = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
                if match:
                    self.port = int(match.group(1))
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(STARTUP_S) or self.port is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.stderr_lines))
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        match = re.search(rf"^specexec_{name}\{{[^}}]*\}} (\S+)$", text, re.M)
        assert match is not None, f"metric specexec_{name} is missing from /metrics:\n{text}"
        return float(match.group(1))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


@pytest.fixture(scope="module")
def server(models):
    server = Server(models, "--max-batch", "4", "--max-tokens", "64")
    yield server
    server.stop()


def generate_alone(models: Path, prompt: str, *flags: str) -> str:
    """`specexec generate` of one prompt: what the server must answer at temperature 0."""
    args = ["generate", "-t", str(models / "target"), "-d", str(models / "draft"), "-p", prompt, *flags]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    return result.stdout.removesuffix("\n")


def chat(client, prompt: str, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                          **{"temperature": 0, "max_tokens": 12, **kwargs})


def test_chat_and_completions_equal_generate_alone(server, models):
    client = server.client()
    answer = chat(client, "w1 w2 w3")
    assert answer.choices[0].message.content == generate_alone(models, "w1 w2 w3", "-n", "12")
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 3
    text = client.completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=12, temperature=0)
    assert text.choices[0].text == generate_alone(models, "w1 w2 w3", "-n", "12", "--no-chat-template")
    assert text.usage.prompt_tokens == 3
    timings = answer.model_extra["timings"]
    assert timings["target_passes"] >= 1 and timings["tokens_per_target_pass"] == pytest.approx(
        12 / timings["target_passes"], rel=1e-3)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_chat_and_completions(server):
    client = server.client()
    whole = chat(client, "w5 w6", max_tokens=20).choices[0].message.content
    chunks = list(chat(client, "w5 w6", max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    pieces = list(client.completions.create(model="tiny", prompt="w5 w6", max_tokens=20, temperature=0,
                                            stream=True))
    plain = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=20, temperature=0)
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text


def test_raw_server_sent_events(server):
    body = {"model": "tiny", "prompt": "w3 w4", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {e["object"] for e in events} == {"text_completion"}
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_and_seeds(server, models):
    client = server.client()
    full = chat(client, "w9", max_tokens=16).choices[0].message.content
    stop = full.split()[3]
    cut = chat(client, "w9", max_tokens=16, stop=[stop, "w99999"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]
    sampled = [chat(client, "w9", max_tokens=16, temperature=0.9, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] == generate_alone(models, "w9", "-n", "16", "--temperature", "0.9", "--seed", "7")
    others = {chat(client, "w9", max_tokens=16, temperature=0.9, seed=s).choices[0].message.content
              for s in (8, 9, 10)}
    assert others != {sampled[0]}


@pytest.mark.parametrize("body, status, param", [
    ({"n": 2}, 400, "n"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"temperature": -1}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 65}, 400, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "w1"}]}, 400, "messages"),
    ({"model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_are_4xx_with_one_line(server, body, status, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "w1"}], **body}
    response = httpx.post(server.url + "/v1/chat/completions", json=request, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and "\n" not in error["message"] and "Traceback" not in error["message"]


def test_malformed_bodies_routes_and_limits(server):
    post = server.url + "/v1/chat/completions"
    assert httpx.post(post, content=b"{not json", timeout=30).status_code == 400
    assert httpx.post(post, content=b"[1, 2]", timeout=30).status_code == 400
    lone_surrogate = b'{"messages": [{"role": "user", "content": "w1 \\ud800"}]}'  # JSON, not valid Unicode
    invalid_text = httpx.post(post, content=lone_surrogate, timeout=30)
    assert invalid_text.status_code == 400 and "UTF-8" in invalid_text.json()["error"]["message"]
    big = httpx.post(post, content=b"x" * (5 * 1024 * 1024), timeout=60)
    assert big.status_code == 413 and "error" in big.json()
    long_prompt = " ".join(["w1"] * 600)
    too_long = httpx.post(server.url + "/v1/completions", json={"prompt": long_prompt}, timeout=30)
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing", timeout=30).status_code == 404
    assert httpx.get(post, timeout=30).status_code == 405
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    with pytest.raises(openai.BadRequestError):  # and the server goes on answering
        chat(server.client(), "w1", n=3)
    assert chat(server.client(), "w1", max_tokens=2).choices[0].message.content


def test_concurrent_clients_equal_one_by_one_and_share_passes(server, models):
    expected = {p: generate_alone(models, p, "-n", "24") for p in PROMPTS}
    passes_before = server.metric("target_passes_total")

    def ask(prompt: str):
        return chat(server.client(), prompt, max_tokens=24)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        assert answer.choices[0].message.content == expected[prompt]
    passes = server.metric("target_passes_total") - passes_before
    alone = sum(a.model_extra["timings"]["target_passes"] for a in answers)
    assert passes < alone  # some target passes served several requests at once


def test_a_client_that_disconnects_frees_its_lane(server):
    cancelled = server.metric("requests_cancelled_total")
    body = {"model": "tiny", "prompt": "w2", "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        for _ in zip(range(2), response.iter_lines(), strict=False):
            pass  # read a little, then hang up
    deadline = time.monotonic() + 30
    while server.metric("requests_cancelled_total") <= cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("requests_cancelled_total") == cancelled + 1
    while server.metric("active_lanes") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("active_lanes") == 0  # the lane itself was freed
    assert chat(server.client(), "w3", max_tokens=3).choices[0].message.content  # still serving


def test_bounded_load_on_loopback(server, models):
    """48 requests from 8 threads, bounded in count and time: every one answered, and right."""
    expected = {p: generate_alone(models, p, "-n", "8", "--no-chat-template") for p in PROMPTS}
    client = server.client()

    def ask(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        text = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        return prompt, text.choices[0].text

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(48)))
    assert time.monotonic() - start < 120
    assert all(text == expected[prompt] for prompt, text in results)
    assert server.metric("queue_depth") == 0


@pytest.fixture(scope="module")
def strict_server(models):
    """API key required, one lane and no waiting room."""
    server = Server(models, "--max-batch", "1", "--max-queue", "0", env={"SPECEXEC_API_KEY": "sesame"})
    yield server
    server.stop()


def test_api_key(strict_server):
    with pytest.raises(openai.AuthenticationError):
        chat(strict_server.client(api_key="wrong"), "w1", max_tokens=2)
    assert httpx.get(strict_server.url + "/v1/models", timeout=30).status_code == 401
    assert chat(strict_server.client(api_key="sesame"), "w1", max_tokens=2).choices[0].message.content
    assert httpx.get(strict_server.url + "/health", timeout=30).status_code == 200  # open, like llama-server


def test_overload_is_503_with_retry_after(strict_server):
    headers = {"Authorization": "Bearer sesame"}
    body = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", strict_server.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as busy:
        lines = busy.iter_lines()
        first = next(lines)  # the one lane is taken
        refused = httpx.post(strict_server.url + "/v1/completions", headers=headers, timeout=30,
                             json={"model": "tiny", "prompt": "w5", "max_tokens": 2})
        rest = [line for line in lines if line]
    assert first.startswith("data: ") and rest[-1] == "data: [DONE]"  # the busy request was served whole
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["code"] == "overloaded"


def test_sigterm_finishes_requests_in_flight_and_exits_0(models):
    server = Server(models, "--max-batch", "2")
    body = {"model": "tiny", "prompt": "w8", "max_tokens": 200, "temperature": 0, "stream": True}
    lines: list[str] = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
        iterator = response.iter_lines()
        lines.append(next(iterator))
        server.process.send_signal(signal.SIGTERM)
        lines += [line for line in iterator if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line and line != "data: [DONE]"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(60) == 0
    stderr = "".join(server.stderr_lines)
    assert "SIGTERM" in stderr and "Traceback" not in stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


@contextlib.contextmanager
def listening_port():
    """A loopback port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_a_taken_port_fails_before_loading(models):
    with listening_port() as port:
        result = subprocess.run([sys.executable, "-m", "specexec_cli", "serve", "-t", str(models / "target"),
                                 "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "loading" not in result.stderr


def test_batch_api_lines_offline_answer_as_the_server_does(server, models, tmp_path):
    """`generate -f` of OpenAI Batch API lines (as `vllm run-batch` takes): the Batch output format, each
    body its own sampling and limits, a bad line an error line (exit 1) while the others run."""
    lines = [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": 12,
                  "temperature": 0}},
        {"custom_id": "text", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "w5 w6", "max_tokens": 9, "temperature": 0.9, "seed": 3}},
        {"custom_id": "many", "method": "POST", "url": "/v1/completions", "body": {"prompt": "w4", "n": 3}},
        {"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "w4"}},
    ]
    source = tmp_path / "batch.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ["generate", "-t", str(models / "target"), "-d", str(models / "draft"), "-f", str(source),
            "--batch-size", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: 2 of 4 requests failed; their output lines carry the error"
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["custom_id"] for r in records] == ["chat", "text", "many", "embed"]
    assert [r["response"]["status_code"] for r in records] == [200, 200, 400, 400]
    assert records[2]["response"]["body"]["error"]["param"] == "n"
    client = server.client()
    chat_answer = chat(client, "w1 w2 w3", max_tokens=12).choices[0].message.content
    assert records[0]["response"]["body"]["choices"][0]["message"]["content"] == chat_answer
    text = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=9, temperature=0.9, seed=3)
    assert records[1]["response"]["body"]["choices"][0]["text"] == text.choices[0].text
    assert records[1]["response"]["body"]["usage"]["completion_tokens"] == 9


def test_a_long_prompt_joining_a_decoding_request_enters_in_pieces(models):
    """Chunked prefill in the server: the long prompt enters 8 tokens a pass beside a streaming request;
    both answers equal `specexec generate`, and the pieces show on /metrics."""
    server = Server(models, "--max-batch", "2", "--prefill-chunk", "8")
    try:
        long_prompt = " ".join(f"w{i}" for i in range(40, 120))
        expected = [generate_alone(models, "w8", "-n", "200"),
                    generate_alone(models, long_prompt, "-n", "40")]
        stream = server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "w8"}], temperature=0, max_tokens=200,
            stream=True)
        pieces = [next(iter(stream)).choices[0].delta.content or ""]
        joined = chat(server.client(), long_prompt, max_tokens=40)  # while the stream decodes
        pieces += [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert ["".join(pieces), joined.choices[0].message.content] == expected
        assert server.metric("prefill_pieces_total") >= 5  # 80+ prompt tokens, 8 a pass
    finally:
        server.stop()
