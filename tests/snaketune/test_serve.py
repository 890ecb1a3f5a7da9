"""Talk to a model: the OpenAI client against the service, limits and errors, 50 concurrent requests, the chat
page in headless Chromium, and the terminal chat."""

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, start_server, workflow_env

KEY = "test-key"


@pytest.fixture(scope="module")
def chat_model(tiny_model):
    from snaketune.serve import ChatModel

    return ChatModel(tiny_model, name="tiny")


@pytest.fixture(scope="module")
def service(chat_model):
    """The service with an API key and a small body limit."""
    from snaketune.serve import create_app
    from snaketune.settings import ServiceSettings

    server, thread, url = start_server(create_app(chat_model, ServiceSettings(api_key=KEY, max_body_bytes=20_000,
                                                                              max_tokens_limit=64)))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def post(url, body: bytes, key=KEY):
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


MESSAGES = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "你好"}]


def test_openai_client_gets_a_completion_and_the_same_text_streamed(service):
    openai = client(service)
    assert [m.id for m in openai.models.list().data] == ["tiny"]
    completion = openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 12 and completion.usage.prompt_tokens > 5
    pieces = [chunk.choices[0].delta.content or "" for chunk in openai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True)]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == text  # greedy: the same answer


def test_fifty_concurrent_requests_all_succeed(service):
    openai = client(service)

    def ask(i):
        reply = openai.chat.completions.create(model="tiny", max_tokens=4,
                                               messages=[{"role": "user", "content": f"question {i}"}])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))
    assert len(answers) == 50 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("body, key, status, message", [
    (b"{not json", KEY, 400, "the body is not valid JSON"),
    (json.dumps({"model": "tiny"}).encode(), KEY, 400, "`messages` is required"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), KEY, 400, "messages[0].role"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 100000}).encode(), KEY, 400, "above this service's limit of 64"),
    (json.dumps({"messages": MESSAGES}).encode(), "wrong", 401, "missing or wrong API key"),
    (json.dumps({"messages": MESSAGES}).encode(), None, 401, "missing or wrong API key"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]}).encode(), KEY, 413, "larger than 20000"),
])
def test_bad_requests_get_the_right_4xx_with_a_json_error(service, body, key, status, message):
    code, reply = post(service, body, key)
    assert code == status and message in reply["error"]["message"] and reply["error"]["code"] == status


@pytest.mark.parametrize("body, status, message", [
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400,
     "messages[0].content[0].text must be a string"),
    (b'{"messages": [{"role": "assistant", "content": [{"type": "image_url", '
     b'"image_url": {"url": "data:image/png;base64,AA=="}}]}]}', 400,
     "`messages[0].content`: only a user turn can hold images"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}',
     400, "must be a base64 data URL"),
    (b'{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}', 400,
     "messages[0].content[0]: a content part is"),
    (b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', 400, "lone surrogate"),
    (b'{"messages": [{"role": "user", "content": 7}]}', 400, "`messages[0].content` must be a string"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}', 400, "`top_p` must be a number from 0"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400, "`temperature` must be"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": "x"}', 400, "`seed` must be a 64-bit integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', 400,
     "`seed` must be a 64-bit integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "`stream` must be true or false"),
    (b'{"messages": [{"role": "user", "content": "' + b"hi " * 240 + b'"}], "max_tokens": 64}', 400,
     "this model's context is 256 tokens"),
])
def test_malformed_client_input_is_a_400_never_a_500(service, body, status, message):
    code, reply = post(service, body)
    assert code == status and message in reply["error"]["message"], reply


def test_an_unknown_model_is_a_404_for_the_openai_client(service):
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as raised:
        client(service).chat.completions.create(model="gpt-5", messages=MESSAGES, max_tokens=4)
    assert raised.value.body["code"] == "model_not_found" and "`gpt-5` does not exist" in raised.value.body["message"]


def test_a_cut_answer_says_length_and_usage_counts_the_generated_ids(service):
    openai = client(service)
    reply = openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 5
    else:  # it said its end-of-turn token first: that token is the last one counted
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens <= 5
    streamed = list(openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == reply.choices[0].finish_reason
    assert streamed[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_top_p_zero_and_temperature_zero_are_greedy(service):
    openai = client(service)
    answers = {openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, **options)
               .choices[0].message.content for options in ({"temperature": 0}, {"top_p": 0}, {"temperature": 0,
                                                                                                "top_p": 0})}
    assert len(answers) == 1
    seeded = {openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0,
                                             seed=7).choices[0].message.content for _ in range(2)}
    assert len(seeded) == 1  # a seed makes sampling repeatable


@pytest.mark.parametrize("headers, message", [
    ({"Origin": "https://evil.example"}, "requests from pages of https://evil.example are not allowed"),
    ({"Host": "rebound.example:8000"}, "Host `rebound.example:8000` is not this service's address"),
])
def test_other_sites_pages_and_foreign_host_names_are_refused(service, headers, message):
    request = urllib.request.Request(service + "/v1/chat/completions", method="POST", headers={
        "Content-Type": "text/plain", "Authorization": f"Bearer {KEY}", **headers},
        data=json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode())
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 403 and message in json.loads(raised.value.read())["error"]["message"]
    same_origin = {"Origin": service, "Authorization": f"Bearer {KEY}"}
    with urllib.request.urlopen(urllib.request.Request(service + "/v1/models", headers=same_origin)) as reply:
        assert reply.status == 200


def test_the_service_binds_to_localhost_by_default():
    sys.path.insert(0, str(REPO / "scripts"))
    from serve import build_parser

    assert build_parser().parse_args(["--run", "x"]).host == "127.0.0.1"


def chat_page_exchange(chat_model, message: str) -> tuple[str, str]:
    """Type ``message`` into the chat page in headless Chromium and wait for the answer to finish; returns the
    text of the user line and of the answer as the page shows them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from browser import headless_chromium
    from snaketune.serve import create_app
    from snaketune.settings import ServiceSettings

    server, thread, url = start_server(create_app(chat_model, ServiceSettings()))
    try:
        with headless_chromium() as browser:
            browser.get(url + "/")
            WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "tiny")
            browser.find_element(By.ID, "message").send_keys(message)
            browser.find_element(By.ID, "send").click()
            answer = WebDriverWait(browser, 120).until(
                lambda b: next((e for e in b.find_elements(By.CSS_SELECTOR, ".assistant")
                                if e.get_attribute("data-done") == "true"), None))
            return browser.find_element(By.CSS_SELECTOR, ".user").text, answer.text
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_chat_page_streams_an_answer_in_headless_chromium(chat_model):
    from snaketune.serve import SamplingSettings

    user, answer = chat_page_exchange(chat_model, "你好")
    expected = chat_model.complete([{"role": "user", "content": "你好"}], SamplingSettings(128))
    assert answer.strip() == expected and expected
    assert user == "you: 你好"


def test_terminal_chat_streams_keeps_history_and_resets(tiny_model):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chat.py"), "--model", str(tiny_model), "--max-new-tokens", "6",
         "--system", "Be brief."],
        input="你好\nWho are you?\n/reset\nhi\n/exit\n", capture_output=True, text=True, env=workflow_env(),
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split(">")[0] for line in lines] == ["assistant", "assistant", "(conversation reset)", "assistant"]


def test_conversation_history_and_reset(chat_model):
    from snaketune.serve import Conversation, SamplingSettings

    conversation = Conversation("Be brief.")
    "".join(conversation.ask(chat_model, "q1", SamplingSettings(4)))
    "".join(conversation.ask(chat_model, "q2", SamplingSettings(4)))
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "Be brief."}]


def test_a_run_not_built_or_not_in_the_config_is_one_clear_error(tmp_path):
    shutil.copytree(REPO / "data", tmp_path / "data")
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config.yaml")
    for run, message in (("identity-lora", "error: run `identity-lora` is not built yet "
                                           "(results/runs/identity-lora/merged missing); build it with "),
                         ("nope", "error: --run: `nope` is not a run of config.yaml (runs: identity-lora, ")):
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), "--run", run, "--configfile",
                                 "config.yaml"], capture_output=True, text=True, env=workflow_env(), input="",
                                cwd=tmp_path)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert message in result.stderr


@pytest.mark.workflow
def test_snakemake_serve_target_needs_only_the_runs_merged_model(demo):
    from conftest import planned_jobs, snakemake

    result = snakemake(demo, "serve", "--dry-run", "--configfile", str(demo / "config.yaml"),
                       "--config", "serve_run=matching-lora")
    assert result.returncode == 0, result.stderr[-2000:]
    assert planned_jobs(result) == [("serve", "")]
    assert "--model results/runs/matching-lora/merged --name matching-lora --host 127.0.0.1 --port 8000" \
        in result.stdout
    wrong = snakemake(demo, "serve", "--dry-run", "--configfile", str(demo / "config.yaml"),
                      "--config", "serve_run=nope")
    assert wrong.returncode != 0 and "serve_run: `nope` is not a run" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_the_key_is_compared_in_constant_time_and_the_scheme_in_any_case(service, monkeypatch):
    import hmac

    from snaketune.serve import key_matches

    compared = []
    original = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or original(a, b))
    assert key_matches(f"bearer {KEY}", KEY) and key_matches(f"BEARER  {KEY} ", KEY)
    assert not key_matches(f"Basic {KEY}", KEY) and not key_matches("Bearer test-kez", KEY)
    assert compared[0] == (KEY.encode(), KEY.encode())  # the whole key through hmac, never ==
    request = urllib.request.Request(service + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def test_a_huge_prompt_is_tokenized_off_the_event_loop(chat_model):
    """A 1 MB prompt takes the tokenizer a while; every other request, and every stream, goes on meanwhile."""
    import threading
    import time

    from snaketune.serve import create_app
    from snaketune.settings import ServiceSettings

    huge = [{"role": "user", "content": "你好 hello " * 110_000}]  # about 1 MB of UTF-8
    began = time.monotonic()
    chat_model.prompt_ids(huge)
    tokenizing = time.monotonic() - began
    server, thread, url = start_server(create_app(chat_model, ServiceSettings(max_body_bytes=4_000_000)))
    try:
        body = json.dumps({"messages": huge}).encode()
        done = threading.Event()
        results = []
        worker = threading.Thread(target=lambda: (results.append(post(url, body, key=None)), done.set()))
        worker.start()
        waits = []
        while not done.is_set():
            start = time.monotonic()
            with urllib.request.urlopen(url + "/v1/models", timeout=60) as response:
                assert response.status == 200
            waits.append(time.monotonic() - start)
            time.sleep(0.02)
        worker.join()
        assert results[0][0] == 400 and "this model's context is" in results[0][1]["error"]["message"]
        assert len(waits) >= 3 and max(waits) < max(0.5, tokenizing / 3), (max(waits), tokenizing)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_chat_page_shows_an_error_that_comes_mid_stream(chat_model, monkeypatch):
    def failing(request):  # the engine emits part of an answer, then fails (as out of GPU memory would)
        request.emit(("text", "Hel"))
        request.emit(("error", "CUDA out of memory"))

    monkeypatch.setattr(chat_model.engine, "submit", failing)
    _, answer = chat_page_exchange(chat_model, "hi")
    assert answer.splitlines() == ["Hel", "error: CUDA out of memory"]


def test_an_image_part_to_a_text_only_model_is_a_400(service):
    png = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAE"
           "lFTkSuQmCC")
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "What is this?"}]}]}
    status, answer = post(service, json.dumps(body).encode())
    assert status == 400 and "is a text-only model: it takes no image parts" in answer["error"]["message"]
