"""dpeft-explore: the page in a real headless Chromium gives what dpeft-generate prints, concurrent requests each get
their own answer, bad requests are refused with a clear message (never a crash), a broken adapter is shown as
unavailable while the others work, and a bad config is one line before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, TINY_ADAPTERS, compose_config

BIN = Path(sys.executable).parent
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
TOKENS = 24  # enough for the tiny adapters' answers, short enough to keep the module under a minute of generation


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, payload: object | None = None, timeout: float = 120) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or a POST when there is a payload (bytes are sent as they are)."""
    data = payload if isinstance(payload, bytes) else None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def hydra_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.mark.slow
def test_bad_explore_config_is_one_line_and_exit_2_before_loading(tmp_path):
    from distributed_peft.cli.preflight import check_overrides
    from distributed_peft.config import validate_explore
    from distributed_peft.errors import ConfigError

    cfg = check_overrides([], "explore", validate_explore)
    assert cfg.host == "127.0.0.1" and cfg.adapters == [] and cfg.model is None
    assert check_overrides(["model=tiny-llama"], "explore", validate_explore).model.context_length == 512
    with pytest.raises(ConfigError) as error:
        check_overrides(["port=70000", "host=not a host", "adapters=[/nope]"], "explore", validate_explore)
    assert error.value.problems == [
        "adapters: '/nope' is not a directory; allowed: adapter directories",
        "port=70000 is invalid; it must be a TCP port in [1, 65535]",
        "host='not a host' is invalid; it must be a host name or IP address such as 127.0.0.1 or 0.0.0.0",
    ]
    proc = subprocess.run([str(BIN / "dpeft-explore"), "port=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "dpeft-explore: error: port=0 is invalid; it must be a TCP port in [1, 65535]\n"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([str(BIN / "dpeft-explore"), f"port={port}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"dpeft-explore: error: port={port} cannot be used on host 127.0.0.1" in proc.stderr


@pytest.fixture(scope="module")
def explorer_url(tmp_path_factory):
    """dpeft-explore serving the three tiny example adapters and a broken one, on a free loopback port."""
    from distributed_peft.modeling.embedded_base import build_base

    build_base(compose_config(["model=tiny-llama"]).model)  # cached in the suite's DPEFT_HOME
    broken = tmp_path_factory.mktemp("broken") / "detox-truncated"
    shutil.copytree(TINY_ADAPTERS / "detox", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    port = free_port()
    adapters = [TINY_ADAPTERS / task for task in ("sql", "detox", "instruct")] + [broken]
    cmd = [str(BIN / "dpeft-explore"), f"adapters=[{','.join(map(str, adapters))}]", f"port={port}"]
    log = (tmp_path_factory.mktemp("explore") / "server.log").open("w+")
    cmd += [f"max_new_tokens={TOKENS}"]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"dpeft-explore did not start (exit {server.returncode}):\n{log.read()[-3000:]}")
            try:
                if call(f"{url}/api/tasks", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_a_broken_adapter_is_unavailable_with_its_reason_and_the_others_work(explorer_url):
    status, tasks = call(f"{explorer_url}/api/tasks")
    by_name = {task["name"]: task for task in tasks}
    assert status == 200 and [by_name[n]["available"] for n in ("sql", "detox", "instruct")] == [True] * 3
    assert by_name["sql"]["title"] == "sql adapter on tiny-llama" and by_name["sql"]["fields"] == [
        "context",
        "question",
    ]
    assert by_name["sql"]["examples"][0]["question"], "inputs are prefilled from the validation split"
    broken = by_name["detox-truncated"]  # refused when its files are read, before anything loads: named by directory
    assert not broken["available"] and "adapter_model.safetensors is truncated" in broken["reason"]
    status, body = call(f"{explorer_url}/api/generate", {"task": "detox-truncated", "prompt": "you idiot"})
    assert status == 409 and body["error"].startswith("task='detox-truncated' is unavailable: adapter=")


@pytest.mark.slow
def test_bad_requests_are_4xx_with_one_line_and_the_server_carries_on(explorer_url):
    generate = f"{explorer_url}/api/generate"
    cases = [
        ({"task": "sql", "prompt": "   "}, 400, "the prompt is empty; type the question for task sql"),
        ({"task": "nope", "prompt": "hi"}, 404, "task='nope' is unknown; allowed: sql, detox, instruct"),
        ({"task": "detox", "prompt": "idiot " * 600}, 413, "exceeds the context length 512 of tiny-llama"),
        ({"task": "detox", "prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens=0 is invalid"),
        ({"task": "detox", "prompt": "hi", "inputs": {"schema": "x"}}, 400, "inputs schema are not fields"),
        (b"{not json", 400, "the body is not JSON"),
        ({"prompt": "hi"}, 400, 'the body must be a JSON object with "task" and "prompt"'),
    ]
    for payload, expected_status, expected in cases:
        status, body = call(generate, payload)
        assert (status, list(body)) == (expected_status, ["error"]), (payload, body)
        assert expected in body["error"] and "\n" not in body["error"]
    status, body = call(generate, {"task": "detox", "prompt": "you are a total idiot", "max_new_tokens": 8})
    assert status == 200 and body["prompt"].endswith("<Toxic>: you are a total idiot\n<Neutral>:")
    sampled = {"task": "detox", "prompt": "you are a total idiot", "max_new_tokens": 8, "temperature": 1.5, "seed": 3}
    first, again = call(generate, sampled)[1], call(generate, sampled)[1]
    assert first == again, "sampling with a seed answers the same again"


@pytest.mark.slow
def test_eight_simultaneous_requests_each_get_their_own_answer(explorer_url):
    _, tasks = call(f"{explorer_url}/api/tasks")
    examples = {task["name"]: task["examples"] for task in tasks if task["available"]}
    requests = [
        {
            "task": name,
            "prompt": ex[name_field],
            "inputs": {k: v for k, v in ex.items() if k != name_field},
            "max_new_tokens": 16,
        }
        for name, name_field in (("sql", "question"), ("detox", "toxic"), ("instruct", "instruction"))
        for ex in examples[name][:3]
    ][:8]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: call(f"{explorer_url}/api/generate", r), requests))
    alone = [call(f"{explorer_url}/api/generate", r) for r in requests]
    assert [status for status, _ in together] == [200] * 8
    for request, (_, answer), (_, single) in zip(requests, together, alone, strict=True):
        assert answer["task"] == request["task"] and request["prompt"] in answer["prompt"]
        assert answer == single, "a request answered among others gives what it gives alone"
    assert len({answer["prompt"] for _, answer in together}) == 8


def chromium() -> tuple[str, str]:
    """Paths of the system Chromium and its driver, or a skip saying how to install them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "Chromium or chromedriver is not installed: `make test` installs them as root with apt-get "
            "(apt-get install chromium chromium-driver); elsewhere install them to run the browser test"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1350"):
        options.add_argument(argument)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a browser online
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def dpeft_generate(adapter: Path, fields: dict[str, str]) -> str:
    """The adapter's answer as `dpeft-generate` prints it for the same sql input."""
    cmd = [
        str(BIN / "dpeft-generate"),
        f"adapters=[{adapter}]",
        f"prompt={hydra_quote(fields['question'])}",
        f"+inputs.context={hydra_quote(fields['context'])}",
        f"max_new_tokens={TOKENS}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("\n  adapter: ", 1)[1].rstrip("\n")


@pytest.mark.slow
def test_page_in_chromium_shows_base_and_adapter_like_dpeft_generate(explorer_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)

    def value(elem_id: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")

    browser.get(explorer_url)
    wait.until(ready.element_to_be_clickable((By.ID, "generate")))
    assert "detox-truncated (unavailable)" in browser.find_element(By.ID, "task").text
    browser.find_element(By.XPATH, "//*[@id='task']//label[contains(., 'detox adapter on tiny-llama')]").click()
    wait.until(lambda _: value("field-0").strip() and "<Toxic>" not in value("field-0"))
    browser.find_element(By.XPATH, "//*[@id='task']//label[contains(., 'sql adapter on tiny-llama')]").click()
    wait.until(lambda _: browser.find_element(By.CSS_SELECTOR, "#field-0 label").text.startswith("context"))
    fields = {"context": value("field-0"), "question": value("field-1")}
    assert fields["context"].startswith("CREATE TABLE") and fields["question"], "prefilled from validation data"
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda _: value("adapter-output").strip())
    adapter, base, prompt = value("adapter-output"), value("base-output"), value("prompt")
    assert prompt.endswith(f"<Schema>: {fields['context']}\n<Question>: {fields['question']}\n<SQL>:")
    assert adapter.upper().startswith("SELECT") and adapter != base
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "explorer.png"))
    assert adapter == dpeft_generate(TINY_ADAPTERS / "sql", fields)

    question = browser.find_element(By.CSS_SELECTOR, "#field-1 textarea")
    question.send_keys(Keys.CONTROL, "a")
    question.send_keys(Keys.DELETE)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda _: "the prompt is empty" in browser.find_element(By.ID, "message").text)
    assert value("adapter-output") == "" and call(f"{explorer_url}/api/tasks")[0] == 200

    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Adapter cards')]").click()
    cards = wait.until(lambda _: [e for e in browser.find_elements(By.TAG_NAME, "img") if e.is_displayed()])
    assert cards and "execution_accuracy" in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(ARTIFACTS / "explorer-cards.png"))
