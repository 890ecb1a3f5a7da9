"""Talk to a model: the OpenAI client against the service, limits and errors, 50 concurrent requests, the chat
page in headless Chromium, and the terminal chat."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, workflow_env

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(app):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def chat_model(tiny_model):
    from snaketune.serve import ChatModel

    return ChatModel(tiny_model, name="tiny")


@pytest.fixture(scope="module")
def service(chat_model):
    """The service with an API key and a small body limit."""
    from snaketune.serve import ServiceSettings, create_app

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
    completion = openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 5
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              openai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, stream=True)]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip() == text  # greedy: the same answer


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


def test_the_service_binds_to_localhost_by_default():
    sys.path.insert(0, str(REPO / "scripts"))
    from serve import build_parser

    assert build_parser().parse_args(["--run", "x"]).host == "127.0.0.1"


def ensure_chromium():
    """Debian's chromium and its driver, installed with apt-get when absent (as the Slurm test does)."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def test_the_chat_page_streams_an_answer_in_headless_chromium(chat_model):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from snaketune.serve import ServiceSettings, create_app

    ensure_chromium()
    server, thread, url = start_server(create_app(chat_model, ServiceSettings()))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text == "tiny")
        browser.find_element(By.ID, "message").send_keys("你好")
        browser.find_element(By.ID, "send").click()
        answer = WebDriverWait(browser, 120).until(
            lambda b: next((e for e in b.find_elements(By.CSS_SELECTOR, ".assistant")
                            if e.get_attribute("data-done") == "true"), None))
        expected = chat_model.complete([{"role": "user", "content": "你好"}],
                                       __import__("snaketune.serve").serve.SamplingSettings(128))
        assert answer.text.strip() == expected and expected
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "you: 你好"
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)


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
