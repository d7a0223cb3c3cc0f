"""GET /metrics: who may read it, and that its values equal what was sent.

The scripted runs go through the fake upstream and read the exposition the way
Prometheus does (prometheus_client's parser): on the embedded defaults and on
PostgreSQL + Redis in one process (the default registry, compared before and
after), and across two worker processes sharing a PROMETHEUS_MULTIPROC_DIR on
PostgreSQL + Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test import Client
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from accounts.models import User
from chatapp import metrics
from chatapp.chat import generation
from chatapp.chat.consumers import ChatConsumer
from chatapp.environ import Env
from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import routing
from chatapp.relay.upstreams import local
from keys import ledger
from keys.actions import do_set_limits, do_set_price
from keys.models import ApiKey
from tests.conftest import make_user
from tests.fake_upstream import Fail, FakeUpstream, Reply
from tests.gateway import Gateway
from tests.live import free_port, start_uvicorn
from tests.services import USING_POSTGRES, USING_REDIS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "chatapp" / "grafana" / "switchboard.json"
TOKEN = "metrics-token-for-the-tests"
USER = [{"role": "user", "content": "hi"}]
SECRET_MODEL = "sk-live-not-a-model-name"  # client input that must never become a label

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels``."""
    return sum(
        number
        for (sample_name, sample_labels), number in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


def scrape(url: str, token: str = TOKEN) -> Samples:
    response = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


class Delta:
    """What a series gained between two scrapes."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


def label_values(samples: Samples) -> set[str]:
    return {label for _name, labels in samples for _key, label in labels}


# --- who may read /metrics ---


@pytest.fixture
def token(settings) -> str:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_METRICS_TOKEN = TOKEN
    settings.SWITCHBOARD_METRICS_ALLOW = []
    return TOKEN


def test_metrics_are_off_without_a_token_or_an_allowed_address(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_METRICS_TOKEN = ""
    settings.SWITCHBOARD_METRICS_ALLOW = []
    assert Client().get("/metrics").status_code == 404


def test_it_refuses_without_the_token(token: str) -> None:
    client = Client()
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert b"switchboard_" not in missing.content
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert wrong["WWW-Authenticate"] == 'Bearer realm="metrics", error="invalid_token"'
    assert client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": TOKEN}).status_code == 401

    answered = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answered.status_code == 200
    assert answered["Content-Type"].startswith("text/plain; version=")
    assert answered["Cache-Control"] == "no-store"
    samples = parse(answered.content.decode())
    assert value(samples, "switchboard_build_info") == 1
    assert client.post("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405


def test_allowed_addresses_read_without_the_token(settings) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_METRICS_TOKEN = ""
    settings.SWITCHBOARD_METRICS_ALLOW = ["10.0.0.0/8", "192.0.2.7/32"]
    client = Client()
    assert client.get("/metrics", REMOTE_ADDR="10.20.30.40").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.7").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.8").status_code == 403
    # A forwarded address counts only from a trusted proxy.
    forged = client.get("/metrics", REMOTE_ADDR="192.0.2.8", HTTP_X_FORWARDED_FOR="10.0.0.1")
    assert forged.status_code == 403
    settings.SWITCHBOARD_TRUSTED_PROXIES = ["192.0.2.8/32"]
    proxied = client.get("/metrics", REMOTE_ADDR="192.0.2.8", HTTP_X_FORWARDED_FOR="10.0.0.1")
    assert proxied.status_code == 200
    # With a token as well, an address outside the list is asked for the token.
    settings.SWITCHBOARD_METRICS_TOKEN = TOKEN
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.1").status_code == 401
    assert client.get("/metrics", REMOTE_ADDR="10.1.1.1").status_code == 200


def test_the_settings_are_parsed_strictly(tmp_path: Path) -> None:
    assert Env({}).directory("PROMETHEUS_MULTIPROC_DIR") is None
    created = tmp_path / "a" / "b"
    assert Env({"PROMETHEUS_MULTIPROC_DIR": str(created)}).directory(
        "PROMETHEUS_MULTIPROC_DIR"
    ) == Path(created)
    assert created.is_dir()
    with pytest.raises(ImproperlyConfigured, match="PROMETHEUS_MULTIPROC_DIR is empty"):
        Env({"PROMETHEUS_MULTIPROC_DIR": ""}).directory("PROMETHEUS_MULTIPROC_DIR")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ImproperlyConfigured, match="cannot create the directory"):
        Env({"PROMETHEUS_MULTIPROC_DIR": str(a_file)}).directory("PROMETHEUS_MULTIPROC_DIR")
    with pytest.raises(ImproperlyConfigured, match="SWITCHBOARD_METRICS_ALLOW"):
        Env({"SWITCHBOARD_METRICS_ALLOW": "10.0.0.0/8,prometheus"}).networks(
            "SWITCHBOARD_METRICS_ALLOW"
        )


# --- a scripted run, one process ---


def test_the_series_equal_what_was_sent(gateway: Gateway, token: str) -> None:
    # Given prices, a key allowing 4 requests a minute and a scripted upstream...
    gpt = CatalogModel.objects.get(name="gpt-fake")
    claude = CatalogModel.objects.get(name="claude-fake")
    do_set_price(
        model=gpt,
        input_price=Decimal("2"),
        output_price=Decimal("8"),
        cached_input_price=Decimal("1"),
    )
    do_set_price(model=claude, input_price=Decimal("3"), output_price=Decimal("15"))
    do_set_limits(key=ApiKey.objects.get(user=gateway.user, name="tests"), rpm=4)
    gateway.fake.script(
        Reply(text="one two three", input_tokens=100, output_tokens=7, cached_tokens=40),
        Reply(text="four five", input_tokens=50, output_tokens=3),
        Reply(text="six", input_tokens=20, output_tokens=2),
        Fail(500),
        Reply(text="after a retry", input_tokens=10, output_tokens=4),
    )
    before = scrape(gateway.url)

    # ...when a client sends a whole reply, a stream, a message, one that needs a retry,
    # one for a model that does not exist, and one over the key's rate limit...
    client = gateway.openai()
    client.chat.completions.create(model="gpt-fake", messages=USER)
    stream = client.chat.completions.create(
        model="gpt-fake", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "four five"
    gateway.anthropic().messages.create(model="claude-fake", max_tokens=50, messages=USER)
    client.chat.completions.create(model="gpt-fake", messages=USER)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=SECRET_MODEL, messages=USER)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-fake", messages=USER)
    records = gateway.wait_records(6)
    assert len(records) == 6
    after = scrape(gateway.url)
    delta = Delta(before, after)

    # then the requests are counted by endpoint, model and outcome, as the ledger has them,
    expected = Counter(
        (
            r.endpoint,
            r.model if r.model in ("gpt-fake", "claude-fake") else "other",
            r.status,
            f"{r.http_status // 100}xx",
        )
        for r in records
    )
    assert expected == {
        ("chat.completions", "gpt-fake", "ok", "2xx"): 3,
        ("messages", "claude-fake", "ok", "2xx"): 1,
        ("chat.completions", "other", "error", "4xx"): 1,
        ("chat.completions", "gpt-fake", "error", "4xx"): 1,
    }
    for (endpoint, model, status, status_class), count in expected.items():
        labels = {"endpoint": endpoint, "model": model, "status": status}
        assert delta("switchboard_requests_total", **labels, status_class=status_class) == count
    assert delta("switchboard_requests_total") == 6
    # the client's model string is no label anywhere,
    assert SECRET_MODEL not in label_values(after)
    # the tokens and cost are what the upstream reported and the prices make,
    assert delta("switchboard_tokens_total", model="gpt-fake", type="input") == 160
    assert delta("switchboard_tokens_total", model="gpt-fake", type="cached") == 40
    assert delta("switchboard_tokens_total", model="gpt-fake", type="output") == 14
    assert delta("switchboard_tokens_total", model="claude-fake", type="input") == 20
    assert delta("switchboard_tokens_total", model="claude-fake", type="output") == 2
    for kind, field in (
        ("input", "input_tokens"),
        ("cached", "cached_tokens"),
        ("output", "output_tokens"),
    ):
        assert delta("switchboard_tokens_total", type=kind) == sum(
            getattr(r, field) for r in records
        )
    gpt_cost = (Decimal(120 * 2 + 40 * 1 + 14 * 8)) / 1_000_000
    claude_cost = Decimal(20 * 3 + 2 * 15) / 1_000_000
    cost = delta("switchboard_cost_total", model="gpt-fake", provider="fake-openai", currency="USD")
    assert cost == pytest.approx(float(gpt_cost), rel=1e-9)
    assert delta("switchboard_cost_total", model="claude-fake") == pytest.approx(
        float(claude_cost), rel=1e-9
    )
    assert delta("switchboard_cost_total") == pytest.approx(float(sum(r.cost for r in records)))
    # latency and time to first token are observed for each request that reached an upstream,
    assert delta("switchboard_request_duration_seconds_count", model="gpt-fake") == 3
    assert delta("switchboard_request_duration_seconds_count", model="claude-fake") == 1
    assert delta("switchboard_request_duration_seconds_count", model="other") == 0
    assert delta("switchboard_time_to_first_token_seconds_count", model="gpt-fake") == 3
    assert delta("switchboard_time_to_first_token_seconds_count") == 4
    assert delta("switchboard_request_duration_seconds_sum", model="gpt-fake") > 0
    # the rate limit refused one request,
    assert delta("switchboard_limiter_refusals_total", kind="rpm") == 1
    assert delta("switchboard_limiter_refusals_total") == 1
    assert ("switchboard_limiter_refusals_total", (("kind", "money_budget"),)) in after
    # and the upstream saw 5 attempts, one failure (a 500) and one retry.
    gpt_route = str(Route.objects.get(model=gpt).pk)
    assert (
        delta("switchboard_upstream_attempts_total", route=gpt_route, provider="fake-openai") == 4
    )
    assert delta("switchboard_upstream_attempts_total", provider="fake-anthropic") == 1
    assert delta("switchboard_upstream_failures_total", route=gpt_route, status_class="5xx") == 1
    assert delta("switchboard_upstream_failures_total") == 1
    assert delta("switchboard_upstream_retries_total", route=gpt_route) == 1
    assert delta("switchboard_upstream_retries_total") == 1
    assert sum(r.attempts for r in records) == 5
    assert value(after, "switchboard_circuit_breaker_state", route=gpt_route) == 0


def test_an_open_circuit_breaker_shows(gateway: Gateway, token: str) -> None:
    gateway.fake.script(Fail(503), Fail(503), Fail(503))
    with pytest.raises(openai.InternalServerError):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    route = str(Route.objects.get(model__name="gpt-fake").pk)
    samples = scrape(gateway.url)
    assert value(samples, "switchboard_circuit_breaker_state", route=route) == 2
    assert (
        "switchboard_circuit_breaker_state",
        (("provider", "fake-openai"), ("route", route)),
    ) in samples
    routing._states[int(route)].open_until = time.monotonic() - 1  # the cool-down ended
    assert value(scrape(gateway.url), "switchboard_circuit_breaker_state", route=route) == 1


def test_an_upstream_that_does_not_answer_fails_with_no_status(
    gateway: Gateway, token: str
) -> None:
    nobody = Provider(
        name="nobody", type="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", timeout=2
    )
    nobody.api_key = "sk-nobody"
    nobody.save()
    gateway.add_model("down-fake", nobody)
    before = scrape(gateway.url)
    with pytest.raises(openai.APIStatusError):
        gateway.openai().chat.completions.create(model="down-fake", messages=USER)
    delta = Delta(before, scrape(gateway.url))
    assert delta("switchboard_upstream_failures_total", provider="nobody", status_class="none") == 3
    assert delta("switchboard_upstream_attempts_total", provider="nobody") == 3
    assert delta("switchboard_requests_total", model="down-fake", status_class="5xx") == 1


# --- gauges of the process's state ---


def test_the_ledger_and_local_queue_gauges_read_their_owners(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ledger.LedgerWriter()  # stands in for this process's writer, never started
    monkeypatch.setattr(ledger, "writer", writer)
    client = Client()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    idle = parse(client.get("/metrics", headers=headers).content.decode())
    assert value(idle, "switchboard_ledger_queue_depth") == 0
    assert value(idle, "switchboard_ledger_write_lag_seconds") == 0
    assert value(idle, "switchboard_local_queue_depth") == 0

    writer.pending = 3
    writer.batch_since = timezone.now() - timedelta(seconds=5)
    monkeypatch.setitem(local.supervisor.waiting, "/models/tiny.gguf", 2)
    busy = parse(client.get("/metrics", headers=headers).content.decode())
    assert value(busy, "switchboard_ledger_queue_depth") == 3
    assert 5 <= value(busy, "switchboard_ledger_write_lag_seconds") < 60
    assert value(busy, "switchboard_local_queue_depth") == 2


def test_the_lag_of_queued_records_is_their_age(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ledger.LedgerWriter()
    monkeypatch.setattr(ledger, "writer", writer)
    now = timezone.now()
    assert metrics.ledger_lag(now) == 0
    writer.queue.put(({"created_at": now - timedelta(seconds=7)}, None, 0))
    writer.pending = 1
    assert metrics.ledger_lag(now) == 7
    writer.batch_since = now - timedelta(seconds=9)  # a batch being written is older
    assert metrics.ledger_lag(now) == 9


def test_the_lag_counts_the_batch_being_written(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ledger.LedgerWriter()  # a stand-in writer, its database write held up
    writer.next_sweep = time.monotonic() + 3600  # no journal recovery from this one
    monkeypatch.setattr(ledger, "writer", writer)
    entered, release = threading.Event(), threading.Event()

    def write_batch(batch: list[dict[str, object]]) -> None:
        entered.set()
        assert release.wait(10)

    monkeypatch.setattr(ledger, "write_batch", write_batch)
    writer.submit({"request_id": "req_lag", "created_at": timezone.now() - timedelta(seconds=4)})
    assert entered.wait(5)
    assert writer.queue.empty()  # the record is in the batch, no longer queued
    assert 4 <= metrics.ledger_lag() < 60
    release.set()
    assert writer.flush(5)
    assert writer.batch_since is None
    assert metrics.ledger_lag() == 0
    writer.close()


@pytest.fixture
def chat_upstream(transactional_db: None, settings) -> Iterator[FakeUpstream]:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_CHAT_TITLES = False
    routing.reset()
    fake = FakeUpstream().start()
    provider = Provider.objects.create(
        name="fake", type="openai", base_url=fake.openai_base_url, timeout=5
    )
    model = CatalogModel.objects.create(name="chat-model", display_name="Chat Model")
    Route.objects.create(model=model, provider=provider, upstream_model="up")
    yield fake
    fake.stop()


def gauge(name: str) -> float:
    metrics.sample()
    return REGISTRY.get_sample_value(name) or 0.0


async def test_open_websockets_and_running_replies_are_counted(
    chat_upstream: FakeUpstream,
) -> None:
    alice = await database_sync_to_async(make_user)("alice@example.com")
    running = set(generation._tasks)
    sockets, replies = gauge("switchboard_websocket_connections"), len(running)
    assert gauge("switchboard_chat_replies_running") == replies
    chat_upstream.script(Reply(text=" ".join(["word"] * 30), chunk_delay=0.03))
    ws = WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/chat/")
    ws.scope["user"] = alice
    connected, _ = await ws.connect()
    assert connected
    assert gauge("switchboard_websocket_connections") == sockets + 1

    await ws.send_json_to({"action": "send", "conversation": None, "text": "Hi", "attachments": []})
    while (await ws.receive_json_from(timeout=10))["type"] != "delta":
        pass
    assert gauge("switchboard_chat_replies_running") == replies + 1
    while (await ws.receive_json_from(timeout=10))["type"] != "done":
        pass
    if started := generation._tasks - running:
        await asyncio.wait(started, timeout=5)  # saved and settled
    assert gauge("switchboard_chat_replies_running") == replies

    still_referenced = list(metrics._sockets)  # closing counts, not garbage collection
    await ws.disconnect()
    assert gauge("switchboard_websocket_connections") == sockets
    assert still_referenced


# --- the dashboard ---


def exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("switchboard_"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def test_the_dashboard_shows_every_series_and_only_those() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    used = {name for expr in expressions for name in re.findall(r"switchboard_\w+", expr)}
    exported = exported_names()
    assert used <= exported, used - exported
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in exported}
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert families == shown, families - shown


# --- two worker processes, multiprocess mode ---


def server_env(directory: Path) -> dict[str, str]:
    database = connection.settings_dict
    return {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "REDIS_URL": str(settings.REDIS_URL),
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_ENCRYPTION_KEY": settings.SWITCHBOARD_ENCRYPTION_KEY,
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
        "SWITCHBOARD_CHAT_TITLES": "false",
        "SWITCHBOARD_METRICS_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "LOG_LEVEL": "WARNING",
    }


def session_cookie(user: User) -> str:
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


def until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.skipif(
    not (USING_POSTGRES and USING_REDIS),
    reason="several server processes share state only through PostgreSQL and Redis",
)
def test_two_workers_add_up_in_multiprocess_mode(gateway: Gateway, tmp_path: Path) -> None:
    from websockets.sync.client import connect

    # Given two workers sharing one PROMETHEUS_MULTIPROC_DIR, and a price...
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal("2"),
        output_price=Decimal("8"),
    )
    directory = tmp_path / "prometheus"
    env = server_env(directory)
    ports = [free_port(), free_port()]
    workers = [start_uvicorn(port, env, ROOT) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        # ...when 7 requests go to them, alternately, one needing a retry, one refused...
        gateway.fake.script(
            *[Reply(text="a b c", input_tokens=11, output_tokens=5)] * 3,
            Fail(503),
            *[Reply(text="a b c", input_tokens=11, output_tokens=5)] * 4,
        )
        for number in range(7):
            stream = number % 2 == 1
            response = httpx.post(
                urls[number % 2] + "/v1/chat/completions",
                headers={"Authorization": f"Bearer {gateway.key}"},
                json={"model": "gpt-fake", "messages": USER, "stream": stream},
                timeout=30,
            )
            assert response.status_code == 200, response.text
        refused = httpx.post(
            urls[1] + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {gateway.key}"},
            json={"model": SECRET_MODEL, "messages": USER},
        )
        assert refused.status_code == 404
        records = gateway.wait_records(8, timeout=10)
        assert len(records) == 8

        # ...then a scrape of either worker has both workers' totals,
        for url in urls:
            samples = scrape(url)
            gpt = {"endpoint": "chat.completions", "model": "gpt-fake"}
            assert value(samples, "switchboard_requests_total", **gpt, status="ok") == 7
            assert value(samples, "switchboard_requests_total", model="other", status="error") == 1
            assert SECRET_MODEL not in label_values(samples)
            assert value(samples, "switchboard_tokens_total", type="input") == 77
            assert value(samples, "switchboard_tokens_total", type="output") == 35
            assert value(samples, "switchboard_cost_total", model="gpt-fake") == pytest.approx(
                float(Decimal(77 * 2 + 35 * 8) / 1_000_000), rel=1e-9
            )
            assert value(samples, "switchboard_cost_total") == pytest.approx(
                float(sum(r.cost for r in records))
            )
            assert value(samples, "switchboard_request_duration_seconds_count") == 7
            assert value(samples, "switchboard_upstream_attempts_total") == 8
            assert value(samples, "switchboard_upstream_failures_total", status_class="5xx") == 1
            assert value(samples, "switchboard_upstream_retries_total") == 1
            assert value(samples, "switchboard_build_info") == 1

        # ...and the gauges add up too: a chat tab open on each worker counts twice.
        cookie = session_cookie(gateway.user)
        with contextlib.ExitStack() as tabs:
            for port in ports:
                tabs.enter_context(
                    connect(
                        f"ws://127.0.0.1:{port}/ws/chat/",
                        additional_headers={"Cookie": cookie},
                        origin=f"http://127.0.0.1:{port}",  # type: ignore[arg-type]
                    )
                )
            until(lambda: value(scrape(urls[1]), "switchboard_websocket_connections") == 2)
        until(lambda: value(scrape(urls[1]), "switchboard_websocket_connections") == 0)
        assert value(scrape(urls[0]), "switchboard_ledger_queue_depth") == 0

        # A worker that exits leaves its counts in the totals and its gauges are dropped.
        first = workers[0]
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        samples = scrape(urls[1])
        assert value(samples, "switchboard_requests_total", status="ok") == 7
        assert value(samples, "switchboard_tokens_total", type="input") == 77
        assert not list(directory.glob(f"gauge_live*_{first.pid}.db"))
        assert list(directory.glob(f"gauge_live*_{workers[1].pid}.db"))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
