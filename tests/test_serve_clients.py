"""`specexec serve` under what real clients send and under faults: content as a list of parts, the
developer role, assistant turns with no content, limits bounded by the model's context, vLLM's
extensions (ignore_eos, min_tokens, stop_token_ids; the others refused unless neutral), completions of
token ids and of several prompts, usage counting exactly the tokens returned, CORS; a pass that fails
fails only its own requests, a crashed engine thread answers every open request and /health says 503.

A real server in a subprocess, the official `openai` client and LangChain's ChatOpenAI (an LLM framework
that speaks the OpenAI API); tiny random models in folders. Greedy answers equal `specexec generate`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_serve import CHAT_TEMPLATE, PROMPTS, Server, chat, generate_alone

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import generate

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from conftest import save_tiny_cli_pair

    root = tmp_path_factory.mktemp("client_models")
    save_tiny_cli_pair(root, positions=128, chat_template=CHAT_TEMPLATE)
    return root


@pytest.fixture(scope="module")
def server(models):
    """No --max-tokens: requests are bounded by the 128-position context alone."""
    server = Server(models, "--max-batch", "4", "--allowed-origins", "http://ui.example")
    yield server
    server.stop()


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=60, **kwargs)


def test_content_parts_developer_role_and_empty_assistant_turns(server, models):
    client = server.client()
    messages = [{"role": "developer", "content": [{"type": "text", "text": "w3"}]},
                {"role": "user", "content": [{"type": "text", "text": "w1"}, {"type": "text", "text": "w2"}]}]
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    # text parts are joined by newlines, which the word tokenizer splits like spaces
    assert answer.choices[0].message.content == generate_alone(models, "w1 w2", "--system", "w3", "-n", "12")
    history = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "w2"}]
    assert client.chat.completions.create(model="tiny", messages=history, max_tokens=4,
                                          temperature=0).choices[0].message.content is not None
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    refused = post(server, "/v1/chat/completions",
                   {"messages": [{"role": "user", "content": [{"type": "text", "text": "w1"}, image]}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages"
    assert "image_url" in refused.json()["error"]["message"]


def test_langchain_chat_openai_talks_to_the_server(server, models):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="tiny",
                                      temperature=0, max_tokens=12, max_retries=0, timeout=60)
    parts = [{"type": "text", "text": "w1 w2"}]  # LangChain sends content parts as they are
    reply = llm.invoke([SystemMessage(content="w3"), HumanMessage(content=parts)])
    assert reply.content == generate_alone(models, "w1 w2", "--system", "w3", "-n", "12")
    streamed = "".join(chunk.content for chunk in llm.stream([HumanMessage(content="w5")]))
    assert streamed == generate_alone(models, "w5", "-n", "12")


def test_limits_come_from_the_context_left(server, models):
    client = server.client()
    answer = client.completions.create(model="tiny", prompt="w1 w2 w3", max_tokens=100, temperature=0)
    assert answer.usage.completion_tokens <= 100  # above the old default cap of 64 and still fine
    unbounded = post(server, "/v1/completions", {"prompt": "w1 w2 w3", "temperature": 0})
    assert unbounded.status_code == 200
    assert unbounded.json()["usage"]["completion_tokens"] <= 128 - 3  # the context left after the prompt
    too_many = post(server, "/v1/completions", {"prompt": "w1 w2 w3", "max_tokens": 126})
    assert too_many.status_code == 400 and "context" in too_many.json()["error"]["message"]
    huge = post(server, "/v1/completions", {"prompt": "w1 " * 300_000, "max_tokens": 2})
    assert huge.status_code == 400  # refused from its length in characters, before encoding


def test_vllm_extensions_change_when_a_run_stops_not_what_it_says(server):
    base = {"prompt": "w9 w4", "max_tokens": 12, "temperature": 0}
    full = post(server, "/v1/completions", base).json()["choices"][0]["text"].split()
    stop_word = full[2]
    stop_id = 4 + int(stop_word[1:])  # the word tokenizer: w<i> is id i + 4
    cut = post(server, "/v1/completions", {**base, "stop_token_ids": [stop_id]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"].split() == full[: full.index(stop_word) + 1]  # the stop id is kept
    later = post(server, "/v1/completions", {**base, "stop_token_ids": [stop_id], "min_tokens": 10}).json()
    words = later["choices"][0]["text"].split()
    shared = min(len(words), len(full))  # past an EOS the run goes on with the target's own tokens
    assert words[:shared] == full[:shared]
    assert later["usage"]["completion_tokens"] >= 10
    eos = post(server, "/v1/completions", {**base, "ignore_eos": True}).json()
    assert eos["usage"]["completion_tokens"] == 12 and eos["choices"][0]["finish_reason"] == "length"
    for neutral in ({"repetition_penalty": 1.0}, {"min_p": 0.0}, {"top_k": -1}, {"skip_special_tokens": True},
                    {"user": "someone"}, {"seed": -5}):
        assert post(server, "/v1/completions", {**base, **neutral}).status_code == 200, neutral
    for name, value in (("repetition_penalty", 1.3), ("min_p", 0.1), ("guided_regex", "w[0-9]"),
                        ("no_such_field", 1), ("top_k", -2)):
        refused = post(server, "/v1/completions", {**base, name: value})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == name, name


def test_a_negative_seed_is_a_seed(server):
    base = {"prompt": "w9", "max_tokens": 8, "temperature": 0.9}
    first = post(server, "/v1/completions", {**base, "seed": -7}).json()["choices"][0]["text"]
    assert post(server, "/v1/completions", {**base, "seed": -7}).json()["choices"][0]["text"] == first


def test_completions_of_token_ids_and_of_several_prompts(server, models):
    client = server.client()
    expected = {p: generate_alone(models, p, "-n", "6", "--no-chat-template") for p in PROMPTS[:3]}
    ids = [4 + int(word[1:]) for word in PROMPTS[0].split()]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == expected[PROMPTS[0]]
    several = client.completions.create(model="tiny", prompt=list(PROMPTS[:3]), max_tokens=6, temperature=0)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert [c.text for c in several.choices] == [expected[p] for p in PROMPTS[:3]]
    assert several.usage.completion_tokens == sum(len(expected[p].split()) for p in PROMPTS[:3])
    mixed = client.completions.create(model="tiny", prompt=[ids, PROMPTS[1]], max_tokens=6, temperature=0)
    assert [c.text for c in mixed.choices] == [expected[PROMPTS[0]], expected[PROMPTS[1]]]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="tiny", prompt=list(PROMPTS[:3]), max_tokens=6,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {i: expected[p] for i, p in enumerate(PROMPTS[:3])}
    bad = post(server, "/v1/completions", {"prompt": [[1, 2], 3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_usage_counts_the_tokens_returned_not_those_past_a_stop_string(server):
    full = chat(server.client(), "w9", max_tokens=16).choices[0].message.content
    stop = full.split()[3]
    cut = chat(server.client(), "w9", max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.usage.completion_tokens == len(cut.choices[0].message.content.split())


def test_cors_for_the_allowed_origin_only(server):
    headers = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization,content-type"}
    preflight = httpx.options(server.url + "/v1/chat/completions", headers=headers, timeout=30)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.options(server.url + "/v1/chat/completions", timeout=30,
                          headers={**headers, "Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_public_address_without_a_key_is_warned_about():
    from specexec_cli.serve.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("")


def test_a_template_that_refuses_the_conversation_is_a_400(make_word_tokenizer):
    from specexec_cli.decoding.config import SamplingConfig
    from specexec_cli.serve.protocol import ApiError, Job, encode_job

    tokenizer = make_word_tokenizer(["w1", "w2"])
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('no system turns') }}{% endif %}{{ m['content'] }}"
                               "{% endfor %}")
    job = Job("chat", "", ({"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}), (), 4,
              SamplingConfig(), None, (), False, False)
    with pytest.raises(ApiError) as refused:
        encode_job(tokenizer, job)
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert "no system turns" in refused.value.message


def test_stop_ids_min_tokens_and_ignore_eos_leave_the_tokens_the_target_picks():
    """In the engine: the same greedy tokens, only the stop point moves."""
    from tiny_pairs import tiny_pair

    target, draft = tiny_pair("llama")
    prompt = torch.tensor([5, 17, 3, 99])
    plain = generate(target, None, prompt, GenerationConfig(method="autoregressive", max_new_tokens=16))
    tokens = plain.token_ids
    eos = tokens[3]
    for method, model in (("autoregressive", None), ("specexec", draft)):
        config = GenerationConfig(method=method, max_new_tokens=16, eos_token_ids=(eos,))
        stopped = generate(target, model, prompt, config)
        assert stopped.token_ids == tokens[: tokens.index(eos) + 1] and stopped.finish_reason == "stop"
        past = generate(target, model, prompt, GenerationConfig(**{**config.__dict__, "ignore_eos": True}))
        assert past.token_ids == tokens and past.finish_reason == "length"
        late = generate(target, model, prompt, GenerationConfig(**{**config.__dict__, "eos_token_ids": (),
                                                                   "stop_token_ids": (eos,),
                                                                   "min_new_tokens": 8}))
        assert late.token_ids == tokens[: len(late.token_ids)] and len(late.token_ids) > 8


# --- faults ----------------------------------------------------------------------------------------


@pytest.fixture
def faulty(models, tmp_path, monkeypatch):
    import test_serve

    real_popen = subprocess.Popen

    def popen(command, *args, **kwargs):  # the driver instead of `python -m specexec_cli`
        if command[1:3] == ["-m", "specexec_cli"]:
            command = [sys.executable, str(TESTS / "fault_drivers.py"), "serve", str(tmp_path), *command[3:]]
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(test_serve.subprocess, "Popen", popen)
    server = Server(models, "--max-batch", "2")
    server.markers = tmp_path
    yield server
    server.stop()


def test_a_failed_pass_fails_only_its_requests_and_the_next_ones_succeed(faulty, models):
    client = faulty.client()
    results: dict[str, object] = {}

    def ask(name: str, prompt: str) -> None:
        try:
            results[name] = chat(client, prompt, max_tokens=40)
        except openai.APIError as exc:
            results[name] = exc

    (faulty.markers / "fail-pass").touch()
    first = [threading.Thread(target=ask, args=(f"first{i}", "w1 w2")) for i in range(2)]
    for thread in first:
        thread.start()
    time.sleep(1.0)
    (faulty.markers / "fail-pass").unlink()  # the next passes run
    for thread in first:
        thread.join(60)
    assert all(isinstance(results[f"first{i}"], openai.APIError) for i in range(2))
    start = time.monotonic()
    after = chat(client, "w1 w2", max_tokens=8)
    assert after.choices[0].message.content == generate_alone(models, "w1 w2", "-n", "8")
    assert time.monotonic() - start < 60
    assert httpx.get(faulty.url + "/health", timeout=30).json() == {"status": "ok"}


def test_a_crashed_engine_thread_answers_everyone_and_health_says_so(faulty):
    client = faulty.client()
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            chat(client, "w3", max_tokens=100)
        except openai.APIError as exc:
            errors.append(exc)

    (faulty.markers / "crash").touch()  # the next engine step crashes: two requests running, one waiting
    threads = [threading.Thread(target=ask) for _ in range(3)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads) and time.monotonic() - start < 30
    assert len(errors) == 3  # every open request was answered, none hangs
    health = httpx.get(faulty.url + "/health", timeout=30)
    assert health.status_code == 503 and "crashed" in json.dumps(health.json())
    refused = httpx.post(faulty.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503


# --- fuzz ------------------------------------------------------------------------------------------

def request_bodies():
    """Bodies as clients might send them: known fields with values of every JSON type, unknown ones."""
    from hypothesis import strategies as st

    from specexec_cli.serve.protocol import HARMLESS, READ, UNSUPPORTED

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(-2, 3),
                        st.just(float("nan")), st.text("w1 2\n\x00", max_size=8))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(["type", "text", "role", "content"]), inner,
                                            max_size=3), max_leaves=6)
    names = st.sampled_from(sorted(READ | HARMLESS | set(UNSUPPORTED) | {"bogus"}))
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant",
                                                              "tool", 3]),
                                     "content": st.one_of(st.text("w1 3", max_size=6), values)})
    return st.fixed_dictionaries({"messages": st.lists(message, max_size=3)},
                                 optional={"max_tokens": st.integers(-2, 6)}).flatmap(
        lambda base: st.dictionaries(names, values, max_size=4).map(lambda extra: {**extra, **base}))


def test_fuzzed_request_bodies_never_get_a_5xx_or_hang(server):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(request_bodies())
    def run(body):
        for path in ("/v1/chat/completions", "/v1/completions"):
            payload = {**body, "max_tokens": body.get("max_tokens", 4)}
            if path.endswith("/completions") and "messages" in payload:
                payload["prompt"] = payload.pop("messages")
            response = httpx.post(server.url + path, content=json.dumps(payload), timeout=30,
                                  headers={"content-type": "application/json"})  # NaN as Python writes it
            assert response.status_code < 500, (payload, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and "\n" not in error["message"]

    run()
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
