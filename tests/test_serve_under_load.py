"""The service under load, as the chat page and scripts use it: hundreds of streaming clients at once, clients
that go away mid-stream, a full queue, and SIGTERM with streams open."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, start_server, workflow_env
from snaketune.serve import ChatModel, create_app
from snaketune.settings import ServiceSettings

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def engine_model(tiny_model):
    return ChatModel(tiny_model, name="tiny", max_batch=32, max_waiting=256)


@pytest.fixture
def service(engine_model):
    server, thread, url = start_server(create_app(engine_model, ServiceSettings()))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


async def stream(client, url: str, max_tokens: int, content: str = "你好") -> dict:
    """One streaming request read to its end: its status, chunks, finish reason and whether [DONE] came."""
    body = {"messages": [{"role": "user", "content": content}], "stream": True, "max_tokens": max_tokens}
    result = {"status": None, "pieces": [], "finish": None, "done": False, "retry_after": None}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        result["status"] = response.status_code
        result["retry_after"] = response.headers.get("retry-after")
        if response.status_code != 200:
            await response.aread()
            return result
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                result["done"] = True
            elif line.startswith("data: "):
                choices = json.loads(line[6:]).get("choices") or [{}]
                result["pieces"].append(choices[0].get("delta", {}).get("content") or "")
                result["finish"] = choices[0].get("finish_reason") or result["finish"]
    return result


def test_256_streams_then_50_more_each_end_complete_or_with_429_and_the_service_stays_responsive(service):
    import httpx

    async def main():
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            first = [asyncio.create_task(stream(client, service, 8, f"问题 {i}")) for i in range(256)]
            await asyncio.sleep(0.2)
            more = [asyncio.create_task(stream(client, service, 8, f"再问 {i}")) for i in range(50)]
            results = await asyncio.wait_for(asyncio.gather(*first, *more), timeout=240)
            began = time.monotonic()
            fresh = await stream(client, service, 4)
            return results, fresh, time.monotonic() - began

    results, fresh, fresh_seconds = asyncio.run(main())
    complete = [r for r in results if r["status"] == 200]
    busy = [r for r in results if r["status"] == 429]
    assert len(complete) + len(busy) == 306
    assert all(r["done"] and r["finish"] in ("stop", "length") for r in complete)
    assert all(r["retry_after"] == "1" for r in busy)
    assert len(complete) >= 256  # a 429 comes only when 256 wait: those (and the running ones) all complete
    assert fresh["status"] == 200 and fresh["done"] and fresh_seconds < 1.0


def test_a_client_that_disconnects_mid_stream_frees_its_batch_slot_at_the_next_step(service, engine_model,
                                                                                    monkeypatch):
    import httpx

    engine = engine_model.engine
    monkeypatch.setattr(engine, "eos", set())  # the abandoned answer would run all of its 240 tokens

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"messages": MESSAGES, "stream": True, "max_tokens": 240}
            async with client.stream("POST", service + "/v1/chat/completions", json=body) as response:
                lines = response.aiter_lines()
                for _ in range(4):
                    await anext(lines)
                closed_at = engine.steps
            left = time.monotonic()  # the connection is closed: the client went away
            while engine.load[0] and time.monotonic() - left < 10:
                await asyncio.sleep(0.002)
            freed, freed_at = time.monotonic() - left, engine.steps
            began = time.monotonic()
            body = {"messages": MESSAGES, "stream": True, "max_tokens": 3}
            async with client.stream("POST", service + "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if '"content"' in line and '"content": ""' not in line:
                        break
            return freed_at - closed_at, freed, engine.steps - freed_at, time.monotonic() - began

    steps_after_leaving, freed, steps_to_first_token, first_token = asyncio.run(main())
    assert steps_after_leaving <= 3  # cancelled at the next step or so, not after the ~236 tokens still due
    assert freed < 2.0
    assert steps_to_first_token <= 2 and first_token < 2.0  # the next request waited for nothing


def test_a_non_streaming_client_that_times_out_cancels_its_generation(service, engine_model, monkeypatch):
    import httpx

    engine = engine_model.engine
    monkeypatch.setattr(engine, "eos", set())
    decode = engine.decode
    monkeypatch.setattr(engine, "decode", lambda: (time.sleep(0.01), decode()))  # a model of 10 ms a step
    steps, cancelled = engine.steps, engine.cancelled
    with pytest.raises(httpx.TimeoutException):
        httpx.post(service + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 240}, timeout=0.3)
    gave_up = time.monotonic()
    while engine.load[0] and time.monotonic() - gave_up < 10:
        time.sleep(0.005)
    assert engine.load == (0, 0) and time.monotonic() - gave_up < 1.5  # noticed within half a second or so
    assert engine.cancelled == cancelled + 1 and engine.steps - steps < 200  # not run to its 240 tokens


def test_a_full_queue_answers_429_with_retry_after(tiny_model):
    import httpx

    from snaketune.batching import Request, SamplingSettings

    model = ChatModel(tiny_model, name="tiny", max_batch=1, max_waiting=1)
    model.engine.stop()  # a busy engine that admits nothing: what waits stays waiting
    model.engine.submit(Request([1, 2, 3], SamplingSettings(4), lambda event: None))
    server, thread, url = start_server(create_app(model, ServiceSettings()))
    try:
        refused = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=30)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "0 running, 1 waiting" in refused.json()["error"]["message"]


def test_sigterm_with_streams_open_exits_within_a_few_seconds(tiny_model, tmp_path):
    import httpx

    from conftest import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(tiny_model),
                                "--port", str(port)], env=workflow_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, "the service did not start"
                time.sleep(0.2)

        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"messages": MESSAGES, "stream": True, "max_tokens": 200, "temperature": 1.0}
                streams = [client.stream("POST", url + "/v1/chat/completions", json=body) for _ in range(3)]
                responses = [await s.__aenter__() for s in streams]
                for response in responses:
                    await anext(response.aiter_lines())
                process.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                await asyncio.to_thread(process.wait, 30)
                return time.monotonic() - sent

        exited_after = asyncio.run(main())
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read()
    # uvicorn shuts down (streams get 3 s, then are cancelled with their generations), then re-raises the signal
    assert process.returncode in (0, -signal.SIGTERM), log[-2000:]
    assert "Finished server process" in log
    assert exited_after < 8, log[-2000:]
