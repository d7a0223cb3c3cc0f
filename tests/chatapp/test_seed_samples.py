"""Every request and code sample of the seed API guides, run against our live gateway.

The guides in ``/work/shared/seeds/*.txt`` are what our API users already know.  Each Python
sample below is copied as it stands, adapted only as the brief allows: the base URL becomes the
live gateway, the key one we issued, the model one of ours.  Where a sample would sleep for
seconds (retry back-off) the sleeps are scaled down, and where it handles errors itself the
SDK's own retries are off (``max_retries=0``) so that its except clauses see our error at once;
where it prints, ``capsys`` checks what it printed.  The curl samples are replayed with httpx: same method, headers and JSON body.

Seed files (cited in each test as ``seed NNN``):

- 000: m9ai API 集成开发指南 (openai SDK, curl, embeddings, streaming, tools, errors, pool, retry)
- 001: MegaLLM 基础用法 (roles, temperature, multi-turn, vision, finish reasons, rate limiter)
- 002: 小艾引擎 API 开发文档 (/v1/messages + /v1/chat/completions + /v1/embeddings, X-Api-Key or
  Bearer, error table 400/401/403/429/502, SSE event names, anthropic SDK)
- 003: API易 Chat Completions (all parameters, roles, streaming, Claude native format, errors)
- 004: "free LLM API" page template (openai SDK basic + streaming, curl, retry helper)

Models: "gpt-fake" is served by an OpenAI upstream, "claude-fake" by an Anthropic one (so every
chat sample parametrized over ``CHAT_MODELS`` exercises both the pass-through and the translated
path, and a failure names the model, and the case where there are several, in its test id),
"embed-fake" serves embeddings.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import anthropic
import httpx
import openai
import pytest
from django.conf import settings
from django.utils import timezone
from openai import OpenAI

from keys.models import ApiKey
from tests.fake_upstream import EMBEDDING_DIMENSIONS, Fail, Reply, embedding_for
from tests.gateway import Gateway
from tests.sse import has_event_names, parse_sse

CHAT_MODELS = ("gpt-fake", "claude-fake")
TEXT = "Hello from the fake upstream."

#: One test per chat model, named in its id: ``test_...[gpt-fake]``, ``test_...[claude-fake]``.
each_chat_model = pytest.mark.parametrize("model", CHAT_MODELS)


# -- helpers ------------------------------------------------------------------------------------


def sample_openai(gateway: Gateway, **options: Any) -> OpenAI:
    """``OpenAI(api_key="YOUR_API_KEY", base_url="https://.../v1")`` with our URL and key."""
    return OpenAI(api_key=gateway.key, base_url=gateway.base_url, **options)


def sample_anthropic(gateway: Gateway, **options: Any) -> anthropic.Anthropic:
    """``anthropic.Anthropic(api_key="sk-gw-...", base_url="https://api1.szaiai.com")``."""
    return anthropic.Anthropic(api_key=gateway.key, base_url=gateway.url, **options)


def bearer(gateway: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"}


def x_api_key(gateway: Gateway) -> dict[str, str]:
    return {"X-Api-Key": gateway.key, "Content-Type": "application/json"}


def sent(gateway: Gateway) -> dict[str, Any]:
    """The JSON body the fake upstream received last."""
    body = gateway.fake.requests[-1].json
    assert isinstance(body, dict)
    return body


def assert_chat_completion_shape(body: dict[str, Any], model: str) -> None:
    """The response example of seeds 000/001/002/003: id, object, created, model, choices, usage."""
    assert body["id"].startswith("chatcmpl")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == model
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == TEXT
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0


def assert_message_shape(body: dict[str, Any], model: str) -> None:
    """Seed 002 §3.1 response: model, id, type, role, content[{type, text}], stop_reason, usage."""
    assert body["model"] == model
    assert body["id"].startswith("msg")
    assert (body["type"], body["role"]) == ("message", "assistant")
    assert body["content"] == [{"type": "text", "text": TEXT}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["input_tokens"] > 0
    assert body["usage"]["output_tokens"] > 0


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """Seed 002 §5 / seed 003 错误响应示例: ``{"error": {"type": ..., "message": ...}}``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


def fail_every_attempt(gateway: Gateway, status: int) -> None:
    """Enough upstream failures for one gateway request (it tries a route three times).

    ``retry-after-ms: 0`` lets the gateway retry at once instead of backing off.
    """
    gateway.fake.script(*[Fail(status, headers={"retry-after-ms": "0"})] * 3)


# -- seed 000: m9ai API 集成开发指南 -------------------------------------------------------------


@each_chat_model
def test_m9ai_curl_chat_completion_returns_the_documented_shape(
    gateway: Gateway, model: str
) -> None:
    # seed 000, 快速开始 › 基础请求示例 › cURL, and API 参考 › 对话补全 › 响应格式
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={"model": model, "messages": [{"role": "user", "content": "你好!"}]},
    )
    assert response.status_code == 200
    assert_chat_completion_shape(response.json(), model)


def test_m9ai_python_quickstart_prints_the_reply(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # seed 000, 快速开始 › 基础请求示例 › Python
    client = OpenAI(api_key=gateway.key, base_url=gateway.base_url)

    response = client.chat.completions.create(
        model="gpt-fake", messages=[{"role": "user", "content": "你好!"}]
    )

    print(response.choices[0].message.content)  # noqa: T201
    assert capsys.readouterr().out == TEXT + "\n"


def test_m9ai_embeddings_sample_returns_a_vector(gateway: Gateway) -> None:
    # seed 000, API 参考 › 文本嵌入 (model "text-embedding-ada-002" → "embed-fake")
    client = sample_openai(gateway)
    response = client.embeddings.create(model="embed-fake", input="要嵌入的文本")

    embedding = response.data[0].embedding
    assert embedding == pytest.approx(embedding_for("要嵌入的文本"), rel=1e-6)


@each_chat_model
def test_m9ai_streaming_sample_prints_the_story_chunk_by_chunk(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 000, API 参考 › 流式输出: the loop indexes choices[0] of every chunk, so no chunk
    # may come without choices (a usage-only chunk would raise IndexError here).
    client = sample_openai(gateway)
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "讲个故事"}], stream=True
    )

    for chunk in response:
        if chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="")  # noqa: T201
    assert capsys.readouterr().out == TEXT


WEATHER_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "获取指定位置的天气信息",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "城市名称,如北京、上海"},
                    "unit": {
                        "type": "string",
                        "enum": ["celsius", "fahrenheit"],
                        "description": "温度单位",
                    },
                },
                "required": ["location"],
            },
        },
    }
]


@each_chat_model
def test_m9ai_function_calling_sample_calls_get_weather(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 000, 高级用法 › 函数调用 (the sample uses json without importing it: imported above)
    client = sample_openai(gateway)

    def get_weather(location: str, unit: str = "celsius") -> dict[str, object]:
        # 实际天气查询逻辑
        return {"temperature": 25, "condition": "sunny"}

    tools = WEATHER_TOOLS
    gateway.fake.script(
        Reply(
            text="",
            tool_calls=[
                {"id": "call_w1", "name": "get_weather", "arguments": {"location": "北京"}}
            ],
        )
    )
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "北京今天天气怎么样?"}],
        tools=tools,
        tool_choice="auto",
    )

    # 处理函数调用
    assert response.choices[0].finish_reason == "tool_calls"
    if response.choices[0].finish_reason == "tool_calls":
        tool_call = response.choices[0].message.tool_calls[0]
        function_name = tool_call.function.name
        arguments = json.loads(tool_call.function.arguments)

        if function_name == "get_weather":
            result = get_weather(**arguments)
            print(result)  # noqa: T201
    assert capsys.readouterr().out == "{'temperature': 25, 'condition': 'sunny'}\n"

    # The upstream was offered the tool in its own format.
    body = sent(gateway)
    if model == "gpt-fake":
        assert body["tools"] == WEATHER_TOOLS
        assert body["tool_choice"] == "auto"
    else:
        assert body["tools"][0]["name"] == "get_weather"
        assert body["tools"][0]["input_schema"]["required"] == ["location"]
        assert body["tool_choice"] == {"type": "auto"}


def test_m9ai_error_handling_sample_catches_auth_rate_limit_and_api_errors(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # seed 000, 错误处理: `create(...)` filled in; the SDK's own retries are off so that each
    # error reaches the sample's except clauses at once.
    from openai import APIError, AuthenticationError, RateLimitError

    def run(client: OpenAI) -> None:
        try:
            client.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": "你好!"}]
            )
        except AuthenticationError:
            print("API 密钥无效,请检查配置")  # noqa: T201
        except RateLimitError:
            print("请求过于频繁,请稍后重试")  # noqa: T201
        except APIError as e:
            print(f"API 错误: {e.message}")  # noqa: T201

    run(OpenAI(api_key="sk-gw-your-key-here", base_url=gateway.base_url, max_retries=0))
    fail_every_attempt(gateway, 429)
    run(sample_openai(gateway, max_retries=0))
    fail_every_attempt(gateway, 500)
    run(sample_openai(gateway, max_retries=0))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["API 密钥无效,请检查配置", "请求过于频繁,请稍后重试"]
    assert lines[2].startswith("API 错误: Error code: 502 - Upstream error: ")


def test_m9ai_connection_pool_client_serves_repeated_and_parallel_requests(
    gateway: Gateway,
) -> None:
    # seed 000, 最佳实践 › 1. 连接池配置
    # 自定义 HTTP 客户端
    http_client = httpx.Client(
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        timeout=httpx.Timeout(60.0),
    )

    client = OpenAI(api_key=gateway.key, base_url=gateway.base_url, http_client=http_client)

    def ask(index: int) -> str | None:
        response = client.chat.completions.create(
            model=CHAT_MODELS[index % 2], messages=[{"role": "user", "content": f"问题 {index}"}]
        )
        return response.choices[0].message.content

    with http_client:
        assert [ask(index) for index in range(4)] == [TEXT] * 4
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert list(pool.map(ask, range(16))) == [TEXT] * 16
    assert len(gateway.records()) == 20


def test_m9ai_tenacity_retry_recovers_from_a_502_then_a_429(gateway: Gateway) -> None:
    # seed 000, 最佳实践 › 2. 重试策略 — tenacity is not a project dependency: this runs when
    # it is installed.  Waits scaled from (multiplier=1, min=4, max=10) seconds to 10 ms.
    pytest.importorskip("tenacity")
    from tenacity import retry, stop_after_attempt, wait_exponential

    client = sample_openai(gateway, max_retries=0)

    @retry(
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.01, min=0.01, max=0.1),
    )
    def chat_with_retry(messages: list[dict[str, str]]) -> Any:
        return client.chat.completions.create(model="gpt-fake", messages=messages)

    fail_every_attempt(gateway, 500)  # → 502 upstream_error
    fail_every_attempt(gateway, 429)  # → 429 rate_limit_error
    response = chat_with_retry([{"role": "user", "content": "你好!"}])
    assert response.choices[0].message.content == TEXT
    assert [record.http_status for record in gateway.records()] == [502, 429, 200]


def test_m9ai_request_timeout_option_is_accepted(gateway: Gateway) -> None:
    # seed 000, 最佳实践 › 3. 请求超时设置
    client = sample_openai(gateway)
    messages = [{"role": "user", "content": "你好!"}]
    response = client.chat.completions.create(
        model="gpt-fake",
        messages=messages,
        timeout=30.0,  # 30秒超时
    )
    assert response.choices[0].message.content == TEXT


# -- seed 001: MegaLLM 基础用法 ------------------------------------------------------------------


@each_chat_model
def test_megallm_basic_usage_with_a_system_message(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 001, 基础用法 › Python
    client = OpenAI(base_url=gateway.base_url, api_key=gateway.key)
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What's the weather like?"},
        ],
        temperature=0.7,
        max_tokens=150,
    )

    print(response.choices[0].message.content)  # noqa: T201
    assert capsys.readouterr().out == TEXT + "\n"
    body = sent(gateway)
    assert (body["temperature"], body["max_tokens"]) == (0.7, 150)
    if model == "gpt-fake":
        assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    else:
        assert body["system"] == "You are a helpful assistant."  # the Anthropic upstream


@pytest.mark.parametrize("temperature", [0.2, 0.5, 0.9], ids=lambda t: f"temperature-{t}")
@each_chat_model
def test_megallm_temperature_presets(gateway: Gateway, model: str, temperature: float) -> None:
    # seed 001, 高级功能 › 温度控制 (`messages=[...]` filled in)
    client = sample_openai(gateway)
    messages = [{"role": "user", "content": "写一句口号"}]
    response = client.chat.completions.create(
        model=model, messages=messages, temperature=temperature
    )
    assert response.choices[0].message.content == TEXT
    assert sent(gateway)["temperature"] == temperature


@each_chat_model
def test_megallm_multi_turn_conversation_reaches_the_upstream_whole(
    gateway: Gateway, model: str
) -> None:
    # seed 001, 高级功能 › 多轮对话
    client = sample_openai(gateway)
    messages = [
        {"role": "system", "content": "你是一个数学导师。"},
        {"role": "user", "content": "15 * 12 是多少?"},
        {"role": "assistant", "content": "15 * 12 = 180"},
        {"role": "user", "content": "现在把它除以 6"},
    ]

    response = client.chat.completions.create(model=model, messages=messages)
    assert response.choices[0].message.content == TEXT
    body = sent(gateway)
    if model == "gpt-fake":
        assert body["messages"] == messages
    else:
        assert body["system"] == "你是一个数学导师。"
        assert [(m["role"], m["content"][0]["text"]) for m in body["messages"]] == [
            ("user", "15 * 12 是多少?"),
            ("assistant", "15 * 12 = 180"),
            ("user", "现在把它除以 6"),
        ]


@each_chat_model
def test_megallm_vision_image_url_with_high_detail(gateway: Gateway, model: str) -> None:
    # seed 001, 高级功能 › 视觉支持 (model "gpt-4-vision" → ours)
    client = sample_openai(gateway)
    response = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "这张图片里有什么?"},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "https://example.com/image.jpg",
                            "detail": "high",  # "low", "high", 或 "auto"
                        },
                    },
                ],
            }
        ],
        max_tokens=300,
    )
    assert response.choices[0].message.content == TEXT
    body = sent(gateway)
    if model == "gpt-fake":
        assert body["messages"][0]["content"][1]["image_url"] == {
            "url": "https://example.com/image.jpg",
            "detail": "high",
        }
    else:
        assert body["messages"][0]["content"][1] == {
            "type": "image",
            "source": {"type": "url", "url": "https://example.com/image.jpg"},
        }


@pytest.mark.parametrize("finish", ["stop", "length", "tool_calls", "content_filter"])
@each_chat_model
def test_megallm_finish_reasons_stop_length_tool_calls_content_filter(
    gateway: Gateway, model: str, finish: str
) -> None:
    # seed 001, 响应格式 › 结束原因 (and seed 003, finish_reason 取值)
    client = sample_openai(gateway)
    calls = [{"name": "get_weather", "arguments": {"location": "巴黎"}}]
    gateway.fake.script(Reply(finish=finish, tool_calls=calls if finish == "tool_calls" else None))
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "法国的首都是什么?"}],
        tools=WEATHER_TOOLS,
    )
    assert response.choices[0].finish_reason == finish


@each_chat_model
def test_megallm_tool_role_carries_a_function_result_back(gateway: Gateway, model: str) -> None:
    # seed 001, 高级功能 › 消息角色: system, user, assistant and tool (工具/函数结果)
    client = sample_openai(gateway)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "你是一个有帮助的助手"},
        {"role": "user", "content": "北京今天天气怎么样?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_w1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "北京"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"temperature": 25}'},
    ]
    response = client.chat.completions.create(model=model, messages=messages, tools=WEATHER_TOOLS)
    assert response.choices[0].message.content == TEXT
    body = sent(gateway)
    if model == "gpt-fake":
        assert body["messages"] == messages
    else:
        assert body["messages"][-1]["content"][0] == {
            "type": "tool_result",
            "tool_use_id": "call_w1",
            "content": [{"type": "text", "text": '{"temperature": 25}'}],
        }


def test_megallm_error_handling_sample_reports_an_upstream_rate_limit(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # seed 001, 最佳实践 › 错误处理 (`create(...)` filled in).  The guide lists APIError first,
    # and RateLimitError is an APIError, so the first clause is the one that prints.
    client = sample_openai(gateway, max_retries=0)
    fail_every_attempt(gateway, 429)
    caught: list[Exception] = []
    try:
        client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "你好"}]
        )
    except openai.APIError as e:
        caught.append(e)
        print(f"API 错误:{e}")  # noqa: T201
    except openai.RateLimitError as e:  # noqa: B025 - unreachable as in the guide
        print(f"达到速率限制:{e}")  # noqa: T201
        # 实现指数退避
    except openai.APIConnectionError as e:  # unreachable too: it is an APIError
        print(f"连接错误:{e}")  # noqa: T201
        # 使用退避重试
    [error] = caught
    assert isinstance(error, openai.RateLimitError)
    assert error.code == "upstream_rate_limited"
    assert capsys.readouterr().out.startswith("API 错误:Error code: 429")


@each_chat_model
def test_megallm_common_patterns_summary_classification_code_generation(
    gateway: Gateway, model: str
) -> None:
    # seed 001, 常见模式: 摘要生成, 分类 and 代码生成 (one section, three snippets)
    client = sample_openai(gateway)
    long_text = "人工智能是计算机科学的一个分支。" * 40
    # 摘要生成
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "你是一个摘要专家。"},
            {"role": "user", "content": f"用 3 个要点总结这段文字:{long_text}"},
        ],
        temperature=0.3,
        max_tokens=150,
    )
    assert response.choices[0].message.content == TEXT

    # 分类
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "将情感分类为积极、消极或中性。"},
            {"role": "user", "content": "我喜欢这个产品!它运行得很好。"},
        ],
        temperature=0.0,
        max_tokens=10,
    )
    assert response.choices[0].message.content == TEXT
    assert sent(gateway)["temperature"] == 0.0

    # 代码生成
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "你是一个 Python 专家。"},
            {"role": "user", "content": "编写一个计算斐波那契数的函数"},
        ],
        temperature=0.2,
        max_tokens=500,
    )
    assert response.choices[0].message.content == TEXT


def test_megallm_client_side_rate_limiter_paces_requests(gateway: Gateway) -> None:
    # seed 001, 速率限制 (`create(...)` filled in; `prompts` given)
    client = sample_openai(gateway)

    class RateLimiter:
        def __init__(self, requests_per_minute: int = 60):
            self.requests_per_minute = requests_per_minute
            self.request_times: list[float] = []

        def wait_if_needed(self) -> None:
            now = time.time()
            # 删除超过 1 分钟的请求
            self.request_times = [t for t in self.request_times if now - t < 60]

            if len(self.request_times) >= self.requests_per_minute:
                sleep_time = 60 - (now - self.request_times[0])
                if sleep_time > 0:
                    time.sleep(sleep_time)

            self.request_times.append(now)

    # 使用方法
    limiter = RateLimiter(60)

    prompts = ["你好", "讲个笑话", "再见"]
    replies = []
    for prompt in prompts:
        limiter.wait_if_needed()
        response = client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": prompt}]
        )
        replies.append(response.choices[0].message.content)
    assert replies == [TEXT] * 3
    assert len(limiter.request_times) == 3


# -- seed 002: 小艾引擎 API 开发文档 ---------------------------------------------------------------


@pytest.mark.parametrize("auth", [x_api_key, bearer], ids=["x-api-key", "bearer"])
def test_xiaoai_both_auth_headers_work_on_every_endpoint(
    gateway: Gateway, auth: Callable[[Gateway], dict[str, str]]
) -> None:
    # seed 002, 2. 认证: "X-Api-Key: sk-gw-..." or "Authorization: Bearer sk-gw-..."
    headers = auth(gateway)
    chat = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=headers,
        json={"model": "gpt-fake", "messages": [{"role": "user", "content": "你好"}]},
    )
    assert chat.status_code == 200, chat.text
    messages = httpx.post(
        gateway.base_url + "/messages",
        headers=headers,
        json={
            "model": "claude-fake",
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "你好"}],
        },
    )
    assert messages.status_code == 200, messages.text
    embeddings = httpx.post(
        gateway.base_url + "/embeddings",
        headers=headers,
        json={"model": "embed-fake", "input": "你好"},
    )
    assert embeddings.status_code == 200, embeddings.text
    models = httpx.get(gateway.base_url + "/models", headers=headers)
    assert models.status_code == 200, models.text


@each_chat_model
def test_xiaoai_messages_parameters_and_response_fields(gateway: Gateway, model: str) -> None:
    # seed 002, 3.1 对话补全(Messages): every parameter of the table, the messages format
    # example and the response fields
    response = httpx.post(
        gateway.base_url + "/messages",
        headers=x_api_key(gateway),
        json={
            "model": model,
            "max_tokens": 1024,
            "stream": False,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop_sequences": ["\n\n"],
            "system": "你是小艾引擎。",
            "messages": [
                {"role": "user", "content": "你好,请介绍一下你自己"},
                {"role": "assistant", "content": "你好!我是小艾引擎..."},
                {"role": "user", "content": "你能做什么?"},
            ],
        },
    )
    assert response.status_code == 200, response.text
    assert_message_shape(response.json(), model)
    body = sent(gateway)
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.5, 0.9, 1024)
    if model == "gpt-fake":
        assert body["stop"] == ["\n\n"]
        assert body["messages"][0] == {"role": "system", "content": "你是小艾引擎。"}
    else:
        assert body["stop_sequences"] == ["\n\n"]
        assert body["system"] == "你是小艾引擎。"


@pytest.mark.parametrize(
    ("model", "finish", "stop_reason"),
    [
        ("gpt-fake", "stop", "end_turn"),
        ("gpt-fake", "length", "max_tokens"),
        # OpenAI upstreams report a stop-sequence hit as plain "stop": no way to tell
        ("gpt-fake", "stop_sequence", "end_turn"),
        ("claude-fake", "stop", "end_turn"),
        ("claude-fake", "length", "max_tokens"),
        ("claude-fake", "stop_sequence", "stop_sequence"),
    ],
)
def test_xiaoai_messages_stop_reasons(
    gateway: Gateway, model: str, finish: str, stop_reason: str
) -> None:
    # seed 002, 3.1 对话补全(Messages) › 响应字段说明: stop_reason is end_turn, max_tokens or
    # stop_sequence
    gateway.fake.script(Reply(finish=finish))
    response = httpx.post(
        gateway.base_url + "/messages",
        headers=x_api_key(gateway),
        json={
            "model": model,
            "max_tokens": 1024,
            "stop_sequences": ["。"],
            "messages": [{"role": "user", "content": "你好"}],
        },
    )
    assert response.json()["stop_reason"] == stop_reason


@each_chat_model
def test_xiaoai_chat_completions_response_fields(gateway: Gateway, model: str) -> None:
    # seed 002, 3.2 对话补全(Chat Completions,OpenAI 兼容): parameters and response example
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={
            "model": model,
            "messages": [{"role": "user", "content": "你好"}],
            "max_tokens": 100,
            "stream": False,
            "temperature": 1.5,
        },
    )
    assert response.status_code == 200, response.text
    assert_chat_completion_shape(response.json(), model)


def test_xiaoai_embeddings_string_array_and_base64(gateway: Gateway) -> None:
    # seed 002, 3.3 文本向量化(Embeddings): input string or array, encoding_format float/base64
    url = gateway.base_url + "/embeddings"
    single = httpx.post(
        url, headers=x_api_key(gateway), json={"model": "embed-fake", "input": "你好"}
    ).json()
    assert single["object"] == "list"
    assert single["model"] == "embed-fake"
    assert single["data"][0]["object"] == "embedding"
    assert single["data"][0]["index"] == 0
    assert single["data"][0]["embedding"] == pytest.approx(embedding_for("你好"))
    assert single["usage"]["prompt_tokens"] == single["usage"]["total_tokens"] > 0

    batch = httpx.post(
        url,
        headers=x_api_key(gateway),
        json={"model": "embed-fake", "input": ["一", "二"], "encoding_format": "float"},
    ).json()
    assert [item["index"] for item in batch["data"]] == [0, 1]

    packed = httpx.post(
        url,
        headers=x_api_key(gateway),
        json={"model": "embed-fake", "input": "你好", "encoding_format": "base64"},
    ).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    vector = struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", raw)
    assert list(vector) == pytest.approx(embedding_for("你好"), rel=1e-6)


@each_chat_model
def test_xiaoai_messages_stream_sends_the_documented_sse_events(
    gateway: Gateway, model: str
) -> None:
    # seed 002, 4. 流式输出: event: message_start / content_block_delta (text_delta) /
    # message_stop, every data line starting "data: " (what ``strict`` checks)
    with httpx.stream(
        "POST",
        gateway.base_url + "/messages",
        headers=x_api_key(gateway),
        json={
            "model": model,
            "max_tokens": 1024,
            "stream": True,
            "messages": [{"role": "user", "content": "你好"}],
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.read(), strict=True)
    names = [name for name, _data in events]
    assert names[0] == "message_start", names
    assert names[-1] == "message_stop", names
    datas = [data for _name, data in events]
    assert all(data["type"] == name for name, data in events)
    assert datas[0]["message"]["model"] == model
    deltas = [d["delta"] for d in datas if d["type"] == "content_block_delta"]
    assert all(delta["type"] == "text_delta" for delta in deltas)
    assert "".join(delta["text"] for delta in deltas) == TEXT


def test_xiaoai_error_table_on_messages_and_chat_completions(gateway: Gateway) -> None:
    # seed 002, 5. 错误处理: {"error": {"type", "message"}} with 400/401/403/429 (and 502 on
    # /v1/chat/completions; on /v1/messages see the xfail test below)
    url = gateway.base_url + "/messages"
    body = {
        "model": "claude-fake",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "你好"}],
    }

    # 400 invalid_request_error: 请求参数错误(如 JSON 格式无效)
    bad_json = httpx.post(url, headers=x_api_key(gateway), content=b'{"model": "claude-fake",')
    assert error_of(bad_json, 400)["type"] == "invalid_request_error"
    # 401 authentication_error: API Key 无效或缺失
    missing = httpx.post(url, headers={"Content-Type": "application/json"}, json=body)
    assert error_of(missing, 401)["type"] == "authentication_error"
    wrong = httpx.post(url, headers={"X-Api-Key": "sk-gw-your-key-here"}, json=body)
    assert error_of(wrong, 401)["type"] == "authentication_error"
    # 403 permission_error: 权限不足(如 Key 已禁用或过期)
    key = ApiKey.objects.get(user=gateway.user)
    key.enabled = False
    key.save()
    disabled = httpx.post(url, headers=x_api_key(gateway), json=body)
    assert error_of(disabled, 403)["type"] == "permission_error"
    key.enabled = True
    key.expires_at = timezone.now() - timedelta(minutes=1)
    key.save()
    expired = httpx.post(url, headers=x_api_key(gateway), json=body)
    assert error_of(expired, 403)["type"] == "permission_error"
    key.expires_at = None
    key.save()
    # 429 rate_limit_error: here the upstream's limit (see the report: no per-key limit of ours)
    fail_every_attempt(gateway, 429)
    limited = httpx.post(url, headers=x_api_key(gateway), json=body)
    assert error_of(limited, 429)["type"] == "rate_limit_error"

    # The same table through the OpenAI-compatible endpoint and Bearer auth (502 included)
    url = gateway.base_url + "/chat/completions"
    body = {"model": "gpt-fake", "messages": [{"role": "user", "content": "你好"}]}
    bad_json = httpx.post(url, headers=bearer(gateway), content=b"{not json")
    assert error_of(bad_json, 400)["type"] == "invalid_request_error"
    missing = httpx.post(url, json=body)
    assert error_of(missing, 401)["type"] == "authentication_error"
    key.enabled = False
    key.save()
    assert error_of(httpx.post(url, headers=bearer(gateway), json=body), 403)["type"] == (
        "permission_error"
    )
    key.enabled = True
    key.save()
    fail_every_attempt(gateway, 429)
    limited = error_of(httpx.post(url, headers=bearer(gateway), json=body), 429)
    assert limited["type"] == "rate_limit_error"
    fail_every_attempt(gateway, 500)
    failing = error_of(httpx.post(url, headers=bearer(gateway), json=body), 502)
    assert (failing["type"], failing["code"]) == ("upstream_error", "upstream_error")


def test_xiaoai_upstream_failure_is_502_upstream_error_on_messages(gateway: Gateway) -> None:
    # seed 002, 5. 错误处理: 502 upstream_error 服务暂时不可用
    fail_every_attempt(gateway, 500)
    response = httpx.post(
        gateway.base_url + "/messages",
        headers=x_api_key(gateway),
        json={
            "model": "claude-fake",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "你好"}],
        },
    )
    assert error_of(response, 502)["type"] == "upstream_error"


def test_xiaoai_suggested_retry_strategy_backs_off_on_429_and_502(gateway: Gateway) -> None:
    # seed 002, 5. 错误处理 › 建议的重试策略: exponential back-off (1s, 2s, 4s, scaled to
    # 10/20/40 ms) on 429 or 502, at most 3 retries
    fail_every_attempt(gateway, 500)
    fail_every_attempt(gateway, 429)
    statuses = []
    for retry in range(4):
        response = httpx.post(
            gateway.base_url + "/messages",
            headers=x_api_key(gateway),
            json={
                "model": "claude-fake",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "你好"}],
            },
        )
        statuses.append(response.status_code)
        if response.status_code not in (429, 502):
            break
        time.sleep(0.01 * 2**retry)
    assert statuses == [502, 429, 200]
    assert response.json()["content"][0]["text"] == TEXT


@each_chat_model
def test_xiaoai_python_anthropic_sdk_messages_create(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 002, 6.1 Python — 对话补全 (base_url without /v1, as in the guide)
    client = anthropic.Anthropic(api_key=gateway.key, base_url=gateway.url)

    response = client.messages.create(
        model=model,
        max_tokens=1024,
        messages=[{"role": "user", "content": "请用三句话介绍人工智能"}],
    )
    print(response.content[0].text)  # noqa: T201
    assert capsys.readouterr().out == TEXT + "\n"


@each_chat_model
def test_xiaoai_python_anthropic_sdk_text_stream(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 002, 6.2 Python — 流式输出
    client = anthropic.Anthropic(api_key=gateway.key, base_url=gateway.url)

    with client.messages.stream(
        model=model,
        max_tokens=1024,
        messages=[{"role": "user", "content": "写一首关于春天的诗"}],
    ) as stream:
        for text in stream.text_stream:
            print(text, end="", flush=True)  # noqa: T201
    assert capsys.readouterr().out == TEXT
    [record] = gateway.wait_records(1)
    assert record.stream is True


@each_chat_model
def test_xiaoai_python_openai_compatible_mode(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 002, 6.3 Python — OpenAI 兼容模式
    client = OpenAI(api_key=gateway.key, base_url=gateway.base_url)

    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "什么是机器学习?"}]
    )
    print(response.choices[0].message.content)  # noqa: T201
    assert capsys.readouterr().out == TEXT + "\n"


@each_chat_model
def test_xiaoai_curl_messages_with_x_api_key_and_no_anthropic_version(
    gateway: Gateway, model: str
) -> None:
    # seed 002, 6.5 cURL: no anthropic-version header, X-Api-Key auth
    response = httpx.post(
        gateway.url + "/v1/messages",
        headers={"Content-Type": "application/json", "X-Api-Key": gateway.key},
        json={
            "model": model,
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "你好"}],
        },
    )
    assert response.status_code == 200, response.text
    assert_message_shape(response.json(), model)


def test_xiaoai_embeddings_sample_prints_the_vector_dimension(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # seed 002, 6.6 文本向量化 (model "xiaoai-embed-v1" → "embed-fake")
    client = OpenAI(api_key=gateway.key, base_url=gateway.base_url)

    response = client.embeddings.create(model="embed-fake", input="人工智能是计算机科学的一个分支")
    print(f"向量维度: {len(response.data[0].embedding)}")  # noqa: T201
    assert capsys.readouterr().out == f"向量维度: {EMBEDDING_DIMENSIONS}\n"


@each_chat_model
def test_xiaoai_multi_turn_messages(gateway: Gateway, model: str) -> None:
    # seed 002, 7. 多轮对话
    client = sample_anthropic(gateway)
    messages: list[Any] = [
        {"role": "user", "content": "我叫小明"},
        {"role": "assistant", "content": "你好小明!很高兴认识你。"},
        {"role": "user", "content": "我叫什么名字?"},
    ]
    response = client.messages.create(model=model, max_tokens=256, messages=messages)
    # 模型会回答"你叫小明"
    assert response.content[0].text == TEXT
    body = sent(gateway)
    if model == "gpt-fake":
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    else:
        assert body["messages"] == messages


@each_chat_model
def test_xiaoai_system_prompt(gateway: Gateway, model: str) -> None:
    # seed 002, 8. 系统提示词
    client = sample_anthropic(gateway)
    system = "你是一位专业的法律顾问,用通俗易懂的语言解答法律问题。"
    response = client.messages.create(
        model=model,
        max_tokens=1024,
        system=system,
        messages=[{"role": "user", "content": "租房合同到期后房东不退押金怎么办?"}],
    )
    assert response.content[0].text == TEXT
    body = sent(gateway)
    if model == "gpt-fake":
        assert body["messages"][0] == {"role": "system", "content": system}
    else:
        assert body["system"] == system


@each_chat_model
def test_xiaoai_base64_image_block_in_a_multi_megabyte_body(gateway: Gateway, model: str) -> None:
    # seed 002, 9. 使用限制 (单次请求体大小 50 MB, 支持图片 base64) and 11. 常见问题
    # (content 中使用 image 类型的内容块, 传入 base64 编码的图片)
    assert settings.SWITCHBOARD_MAX_BODY_BYTES == 50 * 1024 * 1024
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * (3 * 1024 * 1024)).decode()
    response = httpx.post(
        gateway.base_url + "/messages",
        headers=x_api_key(gateway),
        json={
            "model": model,
            "max_tokens": 256,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": image,
                            },
                        },
                        {"type": "text", "text": "这张图片里有什么?"},
                    ],
                }
            ],
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text[:500]
    body = sent(gateway)
    if model == "gpt-fake":
        assert body["messages"][0]["content"][0]["image_url"]["url"] == (
            f"data:image/png;base64,{image}"
        )
    else:
        assert body["messages"][0]["content"][0]["source"]["data"] == image


# -- seed 003: API易 Chat Completions ------------------------------------------------------------


@each_chat_model
def test_apiyi_curl_chat_with_system_prompt_returns_the_documented_fields(
    gateway: Gateway, model: str
) -> None:
    # seed 003, 请求示例 (curl) and 响应格式 › 标准响应 / 响应字段说明
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {gateway.key}"},
        json={
            "model": model,
            "messages": [
                {"role": "system", "content": "你是一个专业的AI助手,请用中文回答问题。"},
                {"role": "user", "content": "请介绍一下API易平台的特色功能"},
            ],
            "temperature": 0.7,
            "max_tokens": 500,
        },
    )
    assert response.status_code == 200, response.text
    assert_chat_completion_shape(response.json(), model)


@each_chat_model
def test_apiyi_every_optional_parameter_is_accepted(gateway: Gateway, model: str) -> None:
    # seed 003, 请求参数 › 可选参数: temperature, max_tokens, top_p, frequency_penalty,
    # presence_penalty, stop, stream, n (the next test), user
    parameters = {
        "temperature": 1.0,
        "max_tokens": 200,
        "top_p": 1.0,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "stop": ["6."],
        "stream": False,
        "user": "user-42",
    }
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={"model": model, "messages": [{"role": "user", "content": "你好"}], **parameters},
    )
    assert response.status_code == 200, response.text
    body = sent(gateway)
    if model == "gpt-fake":
        assert {name: body[name] for name in parameters} == parameters
    else:
        assert body["stop_sequences"] == ["6."]
        assert body["metadata"] == {"user_id": "user-42"}


def test_apiyi_n_gives_several_choices_from_an_openai_upstream(gateway: Gateway) -> None:
    # seed 003, 请求参数 › 可选参数 › n
    # n: several choices where the upstream can give them (OpenAI models)
    several = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={"model": "gpt-fake", "messages": [{"role": "user", "content": "你好"}], "n": 2},
    ).json()
    assert [choice["index"] for choice in several["choices"]] == [0, 1]


def test_apiyi_function_and_tool_roles_reach_an_openai_upstream(gateway: Gateway) -> None:
    # seed 003, 消息格式 › 支持的角色类型: system, user, assistant, function, tool
    messages = [
        {"role": "system", "content": "你是天气助手。"},
        {"role": "user", "content": "北京天气?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"location": "北京"}'},
        },
        {"role": "function", "name": "get_weather", "content": '{"temperature": 25}'},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "上海"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temperature": 22}'},
    ]
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={"model": "gpt-fake", "messages": messages},
    )
    assert response.status_code == 200, response.text
    assert sent(gateway)["messages"] == messages


@pytest.mark.parametrize(
    "image_url",
    [
        {"url": "https://example.com/image.jpg"},
        {"url": "https://example.com/image.jpg", "detail": "high"},
    ],
    ids=["no-detail", "detail-high"],
)
@each_chat_model
def test_apiyi_image_messages_with_and_without_detail(
    gateway: Gateway, model: str, image_url: dict[str, str]
) -> None:
    # seed 003, 消息格式 › 多模态消息格式 and 不同模型的特殊用法 › GPT-4o Vision (图像理解)
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "描述这张图片的内容"},
                        {"type": "image_url", "image_url": image_url},
                    ],
                }
            ],
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == TEXT


@each_chat_model
def test_apiyi_curl_stream_sends_chunks_then_done(gateway: Gateway, model: str) -> None:
    # seed 003, 流式响应 (curl) and 流式响应格式: data: {chat.completion.chunk} ... data: [DONE]
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={
            "model": model,
            "messages": [{"role": "user", "content": "写一首关于AI的诗"}],
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read()
    events = parse_sse(body, strict=True)
    assert not has_event_names(body)
    assert events[-1] == ("message", "[DONE]")
    chunks = [chunk for _name, chunk in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk["model"] == model for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@each_chat_model
def test_apiyi_claude_native_format_with_bearer_and_anthropic_version(
    gateway: Gateway, model: str
) -> None:
    # seed 003, 不同模型的特殊用法 › Claude 原生格式 (curl to /v1/messages)
    response = httpx.post(
        gateway.base_url + "/messages",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {gateway.key}",
            "anthropic-version": "2023-06-01",
        },
        json={
            "model": model,
            "max_tokens": 1000,
            "messages": [{"role": "user", "content": "Hello, Claude!"}],
        },
    )
    assert response.status_code == 200, response.text
    assert_message_shape(response.json(), model)


def test_apiyi_o1_style_request_with_only_a_user_message(gateway: Gateway) -> None:
    # seed 003, 不同模型的特殊用法 › O1 系列推理模型 (no temperature, no system)
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={
            "model": "gpt-fake",
            "messages": [
                {
                    "role": "user",
                    "content": "解决这个数学问题:如果一个数的平方等于64,这个数是多少?",
                }
            ],
        },
    )
    assert response.status_code == 200
    assert set(sent(gateway)) == {"model", "messages"}


# seed 003, 使用技巧 › 2. 优化提示词 (temperature 0.3), 3. 控制输出长度 (max_tokens 150),
# 4. 使用停止词 (stop ["6."])
USAGE_TIPS: list[Any] = [
    pytest.param(
        {
            "messages": [
                {
                    "role": "system",
                    "content": "你是一个专业的技术文档写作助手。请用清晰、准确的语言回答问题,"
                    "如果涉及代码,请提供完整的示例。",
                },
                {"role": "user", "content": "请解释什么是RESTful API,并给出一个Python示例"},
            ],
            "temperature": 0.3,
        },
        id="tip-2-prompt",
    ),
    pytest.param(
        {
            "messages": [{"role": "user", "content": "用100字以内总结人工智能的发展历程"}],
            "max_tokens": 150,
        },
        id="tip-3-length",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "列出前5个最大的城市:"}], "stop": ["6."]},
        id="tip-4-stop-words",
    ),
]


@pytest.mark.parametrize("body", USAGE_TIPS)
@each_chat_model
def test_apiyi_usage_tips_prompt_length_and_stop_words(
    gateway: Gateway, model: str, body: dict[str, Any]
) -> None:
    # seed 003, 使用技巧 › 2. 优化提示词, 3. 控制输出长度, 4. 使用停止词 (USAGE_TIPS above)
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=bearer(gateway),
        json={"model": model, **body},
    )
    assert response.status_code == 200, response.text


def test_apiyi_error_codes_and_the_model_not_found_body(gateway: Gateway) -> None:
    # seed 003, 错误处理 › 常见错误码 (400/401/403/429/500) and 错误响应示例
    url = gateway.base_url + "/chat/completions"
    user = [{"role": "user", "content": "你好"}]

    unknown = httpx.post(
        url, headers=bearer(gateway), json={"model": "gpt-4o-invalid", "messages": user}
    )
    error = error_of(unknown, 404)
    assert error["message"].startswith("The model 'gpt-4o-invalid' does not exist")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    assert set(error) == {"message", "type", "param", "code"}

    bad = httpx.post(url, headers=bearer(gateway), json={"model": "gpt-fake", "messages": "hi"})
    assert error_of(bad, 400)["type"] == "invalid_request_error"
    wrong_key = httpx.post(
        url,
        headers={"Authorization": "Bearer YOUR_API_KEY"},
        json={"model": "gpt-fake", "messages": user},
    )
    assert error_of(wrong_key, 401)["code"] == "invalid_api_key"
    _key, limited_key = ApiKey.issue(user=gateway.user, allowed_models=["claude-fake"])
    forbidden = httpx.post(
        url,
        headers={"Authorization": f"Bearer {limited_key}"},
        json={"model": "gpt-fake", "messages": user},
    )
    assert error_of(forbidden, 403)["type"] == "permission_error"
    fail_every_attempt(gateway, 429)
    assert error_of(
        httpx.post(url, headers=bearer(gateway), json={"model": "gpt-fake", "messages": user}),
        429,
    )["type"] == ("rate_limit_error")
    # 500 服务器错误 upstream: ours answers 502 (a gateway in front of a failing server)
    fail_every_attempt(gateway, 500)
    assert error_of(
        httpx.post(url, headers=bearer(gateway), json={"model": "gpt-fake", "messages": user}),
        502,
    )["code"] == ("upstream_error")


# -- seed 004: "free LLM API" page template ------------------------------------------------------


@each_chat_model
def test_template_python_basic_usage_prints_reply_and_token_count(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 004, 代码示例 › Python 示例 › 基本使用 (model "model-name" → ours)
    # 初始化客户端(请替换为您的 API 密钥)
    client = OpenAI(base_url=gateway.base_url, api_key=gateway.key)

    gateway.fake.script(Reply(input_tokens=20, output_tokens=5))
    # 发送请求
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "你好,请介绍一下自己。"},
        ],
        max_tokens=1000,
        temperature=0.7,
    )

    # 打印响应
    print(response.choices[0].message.content)  # noqa: T201

    # 查看 Token 使用情况
    print(f"\n使用 Tokens: {response.usage.total_tokens}")  # noqa: T201
    assert capsys.readouterr().out == f"{TEXT}\n\n使用 Tokens: 25\n"


@each_chat_model
def test_template_python_streaming(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    # seed 004, 代码示例 › Python 示例 › 流式输出
    client = sample_openai(gateway)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "写一首关于 AI 的诗"}], stream=True
    )

    for chunk in stream:
        if chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="")  # noqa: T201
    assert capsys.readouterr().out == TEXT


@each_chat_model
def test_template_curl_basic_request(gateway: Gateway, model: str) -> None:
    # seed 004, cURL 示例 › 基本请求
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {gateway.key}"},
        json={
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "你好,请介绍一下自己。"},
            ],
            "max_tokens": 1000,
            "temperature": 0.7,
        },
    )
    assert response.status_code == 200, response.text
    assert_chat_completion_shape(response.json(), model)


@each_chat_model
def test_template_curl_streaming_request(gateway: Gateway, model: str) -> None:
    # seed 004, cURL 示例 › 流式输出: what curl prints is "data: {...}" lines ending with
    # "data: [DONE]" (``strict`` checks the "data: " and the blank line after each event)
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {gateway.key}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": "你好"}],
            "stream": True,
        },
    ) as response:
        assert response.status_code == 200
        body = response.read()
    events = parse_sse(body, strict=True)
    assert not has_event_names(body)
    assert events[-1] == ("message", "[DONE]")


def test_template_call_api_with_retry_recovers_from_a_rate_limit(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    # seed 004, 使用建议 › 最佳实践 › 错误处理: call_api_with_retry; sleeps scaled from
    # 2 ** attempt seconds to 10 ms × 2 ** attempt; the SDK's own retries off
    from openai import APIError, RateLimitError

    client = OpenAI(base_url=gateway.base_url, api_key=gateway.key, max_retries=0)

    def call_api_with_retry(messages: Any, max_retries: int = 3) -> Any:
        """带重试机制的 API 调用"""
        for attempt in range(max_retries):
            try:
                response = client.chat.completions.create(model="gpt-fake", messages=messages)
                return response
            except RateLimitError:
                print(f"达到速率限制,等待后重试... ({attempt + 1}/{max_retries})")  # noqa: T201
                time.sleep(0.01 * 2**attempt)  # 指数退避
            except APIError as e:
                print(f"API 错误: {e}")  # noqa: T201
                if attempt == max_retries - 1:
                    raise

        return None

    fail_every_attempt(gateway, 429)
    fail_every_attempt(gateway, 500)
    response = call_api_with_retry([{"role": "user", "content": "示例问题"}])
    assert response.choices[0].message.content == TEXT
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "达到速率限制,等待后重试... (1/3)"
    assert lines[1].startswith("API 错误: Error code: 502")

    # A persistent upstream failure ends in the sample's re-raise of the last APIError.
    for _ in range(3):
        fail_every_attempt(gateway, 500)
    with pytest.raises(openai.InternalServerError) as caught:
        call_api_with_retry([{"role": "user", "content": "示例问题"}])
    assert caught.value.status_code == 502


def test_template_example_case_1_returns_the_answer(gateway: Gateway) -> None:
    # seed 004, 实际应用案例 › 案例 1
    def example_case_1() -> str | None:
        """[功能描述]"""
        client = OpenAI(base_url=gateway.base_url, api_key=gateway.key)

        # 核心代码
        response = client.chat.completions.create(
            model="claude-fake", messages=[{"role": "user", "content": "示例问题"}]
        )

        return response.choices[0].message.content

    # 使用示例
    result = example_case_1()
    assert result == TEXT
