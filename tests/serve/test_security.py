"""Security: loopback by default, the gateway's key enforced, the client's key forwarded or replaced, no key logged."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from draft_rag.cli import build_parser
from draft_rag.commands import serve as serve_command
from draft_rag.serve.settings import GatewaySettings
from tests.integrations.test_compression_adapters import QUERY, TEXTS
from tests.serve.support import gateway_on_loopback

GATEWAY_KEY = "gw-key-5f1c0d7e"
CLIENT_KEY = "client-key-9a8b7c6d"
UPSTREAM_KEY = "upstream-key-0e1f2a3b"
KEYS = (GATEWAY_KEY, CLIENT_KEY, UPSTREAM_KEY)
DOCUMENTS = {"model": "m", "messages": [{"role": "user", "content": QUERY}], "documents": TEXTS}


def test_the_gateway_listens_on_loopback_unless_told_otherwise(monkeypatch):
    assert GatewaySettings(upstream="http://127.0.0.1:8080/v1").host == "127.0.0.1"
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: calls.append((app, options)))
    monkeypatch.setattr("draft_rag.serve.app.create_app", lambda settings: settings)
    args = build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:8080/v1"])
    assert args._run(args) == 0
    [(settings, options)] = calls
    assert settings.host == options["host"] == "127.0.0.1"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", GATEWAY_KEY, f"Basic {GATEWAY_KEY}",
                                           f"Bearer {GATEWAY_KEY}x", f"bearer{GATEWAY_KEY}"])
def test_the_gateway_key_is_required_when_set(stub, specpc, authorization):
    upstream, url = stub
    headers = {} if authorization is None else {"authorization": authorization}
    with gateway_on_loopback(url, specpc, api_key=GATEWAY_KEY) as gateway, httpx.Client(timeout=30) as client:
        refused = [client.post(f"{gateway}/chat/completions", json=DOCUMENTS, headers=headers),
                   client.get(f"{gateway}/models", headers=headers)]
        allowed = client.post(f"{gateway}/chat/completions", json=DOCUMENTS,
                              headers={"authorization": f"Bearer {GATEWAY_KEY}"})
        open_routes = [client.get(gateway.removesuffix("/v1") + path) for path in ("/health", "/metrics")]
    for response in refused:
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        assert GATEWAY_KEY not in response.text
    assert allowed.status_code == 200
    assert [r.status_code for r in open_routes] == [200, 200]
    assert len(upstream.chats()) == 1 and upstream.received[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize(("settings", "client_key", "upstream_sees"), [
    ({}, CLIENT_KEY, f"Bearer {CLIENT_KEY}"),
    ({"upstream_api_key": UPSTREAM_KEY}, CLIENT_KEY, f"Bearer {UPSTREAM_KEY}"),
    ({"api_key": GATEWAY_KEY}, GATEWAY_KEY, None),
    ({"api_key": GATEWAY_KEY, "upstream_api_key": UPSTREAM_KEY}, GATEWAY_KEY, f"Bearer {UPSTREAM_KEY}"),
], ids=["forwarded", "replaced", "gateway-key-kept", "gateway-key-and-upstream-key"])
def test_authorization_is_forwarded_or_replaced_and_never_logged(stub, specpc, caplog, capfd, settings, client_key,
                                                                 upstream_sees):
    caplog.set_level(logging.DEBUG)
    upstream, url = stub
    with gateway_on_loopback(url, specpc, **settings) as gateway:
        with openai.OpenAI(base_url=gateway, api_key=client_key, max_retries=0) as client:
            client.chat.completions.create(model="m", messages=DOCUMENTS["messages"], extra_body={"documents": TEXTS})
            client.chat.completions.create(model="m", messages=DOCUMENTS["messages"], stream=True)
            client.models.list()
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="m", messages=[], extra_body={"documents": TEXTS})
        with openai.OpenAI(base_url=gateway, api_key="not-the-key", max_retries=0) as stranger:
            if "api_key" in settings:
                with pytest.raises(openai.AuthenticationError):
                    stranger.models.list()
    assert [r["headers"].get("authorization") for r in upstream.received] == [upstream_sees] * 3
    captured = capfd.readouterr()
    logged = caplog.text + captured.out + captured.err
    assert "POST /v1/chat/completions" in logged, "the logs were captured"
    assert not any(key in logged for key in KEYS)


def test_keys_never_reach_logs_when_the_upstream_fails(specpc, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    # Nothing listens on port 9 of the loopback (discard): every forward fails with 502.
    with gateway_on_loopback("http://127.0.0.1:9/v1", specpc, upstream_api_key=UPSTREAM_KEY) as gateway, \
            openai.OpenAI(base_url=gateway, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model="m", messages=DOCUMENTS["messages"], extra_body={"documents": TEXTS})
    assert error.value.status_code == 502
    captured = capfd.readouterr()
    logged = caplog.text + captured.out + captured.err
    assert "upstream http://127.0.0.1:9/v1 failed" in logged
    assert not any(key in logged for key in KEYS)


def test_settings_never_show_keys():
    settings = GatewaySettings(upstream="http://127.0.0.1:8080/v1", api_key=GATEWAY_KEY, upstream_api_key=UPSTREAM_KEY)
    assert not any(key in repr(settings) for key in KEYS)
    for bad in (" padded ", "two\nlines", ""):
        with pytest.raises(ValueError, match="api_key must be") as error:
            GatewaySettings(upstream="http://127.0.0.1:8080/v1", api_key=bad)
        assert bad.strip() not in str(error.value) or not bad.strip()
    with pytest.raises(ValueError, match="without query, fragment or credentials") as error:
        GatewaySettings(upstream=f"http://user:{UPSTREAM_KEY}@127.0.0.1:8080/v1")
    assert UPSTREAM_KEY not in str(error.value)


def test_keys_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(serve_command.API_KEY_ENV, GATEWAY_KEY)
    monkeypatch.setenv(serve_command.UPSTREAM_API_KEY_ENV, UPSTREAM_KEY)
    args = build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:8080/v1"])
    settings = serve_command.settings_from_args(args)
    assert (settings.api_key, settings.upstream_api_key) == (GATEWAY_KEY, UPSTREAM_KEY)
    monkeypatch.setenv(serve_command.API_KEY_ENV, "")
    args = build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:8080/v1", "--api-key", "flag-key"])
    assert serve_command.settings_from_args(args).api_key == "flag-key"
    args = build_parser().parse_args(["serve", "--upstream", "http://127.0.0.1:8080/v1"])
    assert serve_command.settings_from_args(args).api_key is None, "an empty variable means no key"
