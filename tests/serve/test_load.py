"""Concurrency: many clients at once (threads and asyncio tasks, streaming and not) get the same answers as one
client alone, streams do not wait for each other, and a bounded load test leaves no thread or socket behind."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from draft_rag.serve.app import serve_in_thread
from tests.integrations.conftest import finishes_within
from tests.integrations.test_compression_adapters import QUERY, TEXTS
from tests.serve.support import StubUpstream, gateway_on_loopback, make_specpc, open_sockets

REQUEST = {"model": "m", "messages": [{"role": "user", "content": QUERY}], "documents": TEXTS}


def answer_of(client: openai.OpenAI, stream: bool, request: dict = REQUEST) -> str:
    extra = {k: v for k, v in request.items() if k not in ("model", "messages")}
    if not stream:
        completion = client.chat.completions.create(model=request["model"], messages=request["messages"],
                                                    extra_body=extra)
        return completion.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=request["model"], messages=request["messages"], stream=True,
                                            extra_body=extra)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_concurrent_threads_and_tasks_get_what_one_client_gets(stub, specpc):
    upstream, url = stub
    with gateway_on_loopback(url, specpc) as gateway:
        with openai.OpenAI(base_url=gateway, api_key="k", max_retries=0, timeout=60) as client:
            alone = answer_of(client, stream=False)
            reference = upstream.chats()[0]["body"]
            upstream.received.clear()

            def many_threads() -> list[str]:
                with ThreadPoolExecutor(16) as pool:
                    return list(pool.map(lambda i: answer_of(client, stream=i % 2 == 1), range(16)))

            threaded = finishes_within(120, many_threads)

        async def many_tasks() -> list[str]:
            async with openai.AsyncOpenAI(base_url=gateway, api_key="k", max_retries=0, timeout=60) as client:

                async def one(stream: bool) -> str:
                    extra = {"documents": TEXTS}
                    if not stream:
                        done = await client.chat.completions.create(model="m", messages=REQUEST["messages"],
                                                                    extra_body=extra)
                        return done.choices[0].message.content or ""
                    chunks = await client.chat.completions.create(model="m", messages=REQUEST["messages"],
                                                                  stream=True, extra_body=extra)
                    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

                return await asyncio.gather(*(one(i % 2 == 1) for i in range(16)))

        tasks = finishes_within(120, lambda: asyncio.run(many_tasks()))
    assert alone == f"Answer to: {QUERY}"
    assert threaded == [alone] * 16 and tasks == [alone] * 16
    bodies = [r["body"] for r in upstream.chats()]
    assert len(bodies) == 32
    assert all({k: v for k, v in body.items() if k != "stream"} == reference for body in bodies), \
        "every request was compressed exactly as the lone one"


def test_streams_do_not_wait_for_each_other(specpc):
    slow = StubUpstream(stream_delay=0.1)
    with serve_in_thread(slow.app()) as url, gateway_on_loopback(f"{url}/v1", specpc) as gateway:
        question = {"model": "m", "messages": [{"role": "user", "content": "one two three four five six seven"}]}

        def one_stream(_: int) -> tuple[str, float]:
            started = time.perf_counter()
            with openai.OpenAI(base_url=gateway, api_key="k", max_retries=0, timeout=60) as client:
                text = answer_of(client, stream=True, request=question)
            return text, time.perf_counter() - started

        def streams() -> list[tuple[str, float]]:
            with ThreadPoolExecutor(12) as pool:
                return list(pool.map(one_stream, range(12)))

        started = time.perf_counter()
        results = finishes_within(120, streams)
        wall = time.perf_counter() - started
    alone = max(seconds for _, seconds in results)
    assert {text for text, _ in results} == {"Answer to: one two three four five six seven"}
    # Each stream takes about 1 s (10 events 0.1 s apart); twelve in a row would take 12 s.
    assert wall < 6, f"12 concurrent streams took {wall:.1f} s (the longest {alone:.1f} s): they were serialised"


def _settle(baseline: tuple[int, int], seconds: float = 10) -> tuple[int, int]:
    """Threads and sockets once the servers' threads have wound down (or ``seconds`` have passed)."""
    deadline = time.monotonic() + seconds
    while True:
        now = threading.active_count(), open_sockets()
        if now <= baseline or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def _percentiles(values: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return statistics.median(values), cuts[18]


def test_bounded_load_32_clients_streaming_and_not(tiny_draft):
    """32 concurrent clients, 4 requests each (with and without documents, streaming and not), on loopback."""
    clients, per_client = 32, 4
    baseline = threading.active_count(), open_sockets()
    upstream = StubUpstream()
    with serve_in_thread(upstream.app()) as url, gateway_on_loopback(f"{url}/v1", make_specpc(tiny_draft)) as gateway:
        # Added latency, measured alone: the same passthrough request straight to the upstream and via the gateway.
        plain = {"model": "m", "messages": [{"role": "user", "content": "Say hi."}]}
        latency: dict[str, list[float]] = {"direct": [], "gateway": []}
        with httpx.Client(timeout=30) as client:
            for _ in range(40):
                for name, base in (("direct", f"{url}/v1"), ("gateway", gateway)):
                    started = time.perf_counter()
                    assert client.post(f"{base}/chat/completions", json=plain).status_code == 200
                    latency[name].append(time.perf_counter() - started)

        async def one_client(index: int) -> list[tuple[bool, float]]:
            outcomes = []
            async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
                for turn in range(per_client):
                    question = f"Question {index}-{turn}: {QUERY}"
                    body: dict = {"model": "m", "messages": [{"role": "user", "content": question}],
                                  "stream": turn % 2 == 1}
                    if (index + turn) % 2 == 0:
                        body["documents"] = TEXTS[index % 3:index % 3 + 3]
                    started = time.perf_counter()
                    response = await client.post("/chat/completions", json=body)
                    text = response.text
                    if body["stream"]:
                        ok = text.rstrip().endswith("data: [DONE]") and f"{index}-{turn}:" in text
                    else:
                        ok = response.json()["choices"][0]["message"]["content"] == f"Answer to: {question}"
                    outcomes.append((response.status_code == 200 and ok, time.perf_counter() - started))
            return outcomes

        async def load() -> list[tuple[bool, float]]:
            results = await asyncio.gather(*(one_client(i) for i in range(clients)))
            return [outcome for result in results for outcome in result]

        started = time.perf_counter()
        outcomes = finishes_within(180, lambda: asyncio.run(load()))
        wall = time.perf_counter() - started
        assert upstream.active == 0, "an upstream stream is still open"
    after = _settle(baseline)

    assert len(outcomes) == clients * per_client
    assert all(ok for ok, _ in outcomes), f"{sum(not ok for ok, _ in outcomes)} requests answered wrongly"
    assert len(upstream.chats()) == clients * per_client + 2 * 40
    assert after <= baseline, f"threads and sockets {baseline} before, {after} after: something leaked"

    direct, via = _percentiles(latency["direct"]), _percentiles(latency["gateway"])
    under_load = _percentiles([seconds for _, seconds in outcomes])
    print(f"\ngateway load test: {len(outcomes)} requests from {clients} clients in {wall:.1f} s = "
          f"{len(outcomes) / wall:.1f} requests/s; latency under load p50 {under_load[0] * 1e3:.0f} ms, "
          f"p95 {under_load[1] * 1e3:.0f} ms")
    print(f"gateway added latency (passthrough, one at a time): p50 {(via[0] - direct[0]) * 1e3:.1f} ms, "
          f"p95 {(via[1] - direct[1]) * 1e3:.1f} ms (direct p50 {direct[0] * 1e3:.1f} ms, "
          f"via the gateway p50 {via[0] * 1e3:.1f} ms)")


@pytest.mark.parametrize("stream", [False, True])
def test_requests_without_documents_do_not_queue_behind_compressions(stub, specpc, stream, monkeypatch):
    upstream, url = stub
    release = threading.Event()
    compress = specpc.compress

    def held(*args, **kwargs):
        release.wait(30)
        return compress(*args, **kwargs)

    monkeypatch.setattr(specpc, "compress", held)
    with gateway_on_loopback(url, specpc) as gateway, openai.OpenAI(base_url=gateway, api_key="k", max_retries=0,
                                                                    timeout=30) as client:
        with ThreadPoolExecutor(4) as pool:
            held_requests = [pool.submit(answer_of, client, False) for _ in range(3)]
            time.sleep(0.3)
            started = time.perf_counter()
            plain = answer_of(client, stream, {"model": "m", "messages": [{"role": "user", "content": "Hi?"}]})
            waited = time.perf_counter() - started
            release.set()
            assert [f.result(timeout=60) for f in held_requests] == [f"Answer to: {QUERY}"] * 3
    assert plain == "Answer to: Hi?"
    assert waited < 5
