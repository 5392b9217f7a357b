"""The attention viewer in a real browser: headless Debian chromium (make install) via selenium.

One live server (the tiny random-weight Llama with the default model's tokenizer, both layers
captured) serves `GET /attention`. The page is driven like a user would: type a chat, pick k and
per-layer lists, generate (streamed through /v1/chat/completions), hover a generated token; the
highlighted prompt positions must equal the top-k the API returns for the same request at
temperature 0 (also with the form's heads and head aggregation, max and mean). Then the layer and
head selectors, loading a saved report JSON into the page, and a
file written by `sglang.attention_tokens.save_html` (the same renderer). Screenshots go to
$SGLANG_TEST_ARTIFACTS (default test/srt/artifacts/, ignored by git); their paths are printed.
Without chromium, chromedriver or selenium the browser tests skip, saying which is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sglang.attention_tokens import save_html
from sglang.srt.entrypoints.attention_viewer import register_attention_viewer
from sglang.srt.server_args import ServerArgs
from sglang.test.served_tiny import make_tiny_served_model
from sglang.test.test_utils import find_free_port, popen_launch_server, terminate

ARTIFACTS = Path(
    os.environ.get("SGLANG_TEST_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts"
)
QUESTION = "What is the capital of France? Answer in one word."
K = 3
MAX_TOKENS = 6
LENS_N = 3
WAIT_S = 120


def _browser_missing() -> str:
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (make install adds Debian's packages)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e 'python[test]')"
    return ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: Any) -> Iterator[str]:
    model = make_tiny_served_model(str(tmp_path_factory.mktemp("tiny-served")))
    url = f"http://127.0.0.1:{find_free_port()}"
    args = ["--return-attention-tokens", "--attention-capture-layers", "all"]
    proc = popen_launch_server(model, url, other_args=args + ["--max-total-tokens", "8192"])
    try:
        yield url
    finally:
        terminate(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _wait(driver: Any, script: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
        lambda d: d.execute_script(script)
    )


# The page's phase once it leaves idle/running (it changes after the view is drawn).
_SETTLED = "const p = document.body.dataset.phase; return !['idle', 'running'].includes(p) && p"


def _hover(driver: Any, css: str) -> list[int]:
    """Move the mouse onto the element; the positions now highlighted, ascending."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, css)).perform()
    return _highlighted(driver)


def _highlighted(driver: Any) -> list[int]:
    script = "return [...document.querySelectorAll('.tok.hl')].map(e => +e.dataset.pos)"
    return sorted(driver.execute_script(script))


def _select(driver: Any, css: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.CSS_SELECTOR, css)).select_by_value(value)


def _positions(tops: list[dict]) -> list[int]:
    return sorted(a["position"] for a in tops)


def test_page_only_with_the_flag() -> None:
    """Without --return-attention-tokens the viewer's routes do not exist (404)."""
    app = FastAPI()
    register_attention_viewer(app, tokenizer_manager=None, server_args=ServerArgs(model_path="m"))
    client = TestClient(app)
    assert client.get("/attention").status_code == 404
    assert client.post("/attention/tokens", json={"prompt": "a"}).status_code == 404


def test_page_and_prompt_tokens(server: str) -> None:
    page = requests.get(f"{server}/attention", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ("http://", "https://", "src=", "<link"):  # self-contained, works offline
        assert needle not in page.text
    messages = [{"role": "user", "content": QUESTION}]
    got = requests.post(f"{server}/attention/tokens", json={"messages": messages}, timeout=30)
    assert got.status_code == 200, got.text
    tokens = got.json()
    reply = requests.post(
        f"{server}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 1, "return_attention_tokens": True},
        timeout=60,
    ).json()
    assert reply["usage"]["prompt_tokens"] == len(tokens["ids"]) == len(tokens["tokens"])
    assert QUESTION in "".join(tokens["tokens"])
    bad = requests.post(f"{server}/attention/tokens", json={"prompt": "a", "messages": messages})
    assert bad.status_code == 400 and "exactly one" in bad.json()["message"]


def _ask(server: str, **fields: Any) -> requests.Response:
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_attention_tokens": True,
        "attention_tokens_top_k": K,
        "attention_layers": [0, 1],
        "attention_layer_aggregation": "none",
        **fields,
    }
    return requests.post(f"{server}/v1/chat/completions", json=body, timeout=120)


def _api_report(server: str, **fields: Any) -> dict[str, Any]:
    reply = _ask(server, **fields)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["attention_tokens"]


def test_live_page(server: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(f"{server}/attention")
    form = driver.find_element(By.ID, "attn-form")
    text = form.find_element(By.NAME, "input")
    text.clear()
    text.send_keys(QUESTION)
    for name, value in (("max_tokens", MAX_TOKENS), ("attention_tokens_top_k", K)):
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(str(value))
    form.find_element(By.NAME, "attention_layers").send_keys("0,1")
    form.find_element(By.NAME, "logit_lens").send_keys("0,1")
    lens_n = form.find_element(By.NAME, "logit_lens_top_n")
    lens_n.clear()
    lens_n.send_keys(str(LENS_N))
    _select(driver, "select[name=attention_layer_aggregation]", "none")
    driver.find_element(By.ID, "attn-run").click()
    phase = _wait(driver, _SETTLED)  # the click set it to running before returning
    assert phase == "done", driver.find_element(By.ID, "attn-error").text
    held = driver.execute_script("return window.attnState.report")
    api = _api_report(server, logit_lens={"layers": [0, 1], "top_n": LENS_N})
    assert [e["token_id"] for e in held["content"]] == [e["token_id"] for e in api["content"]]
    assert len(api["content"]) == MAX_TOKENS

    # Hover a generated token: the highlighted positions are the API's top-k for it.
    for t in (0, 2):
        lit = _hover(driver, f'.tok.gen[data-gen="{t}"]')
        assert lit == _positions(api["content"][t]["layers"]["0"])
    _select(driver, "select.layer", "1")
    _hover(driver, '.tok.gen[data-gen="3"]')
    assert _highlighted(driver) == _positions(api["content"][3]["layers"]["1"])
    rows = driver.find_elements(By.CSS_SELECTOR, ".detail table.topk tr")
    assert len(rows) == K + 1
    # The logit-lens table: one row per lens layer, the API's top tokens in order.
    lens_rows = driver.find_elements(By.CSS_SELECTOR, ".detail table.lens tr")[1:]
    lens = api["content"][3]["logit_lens"]
    assert [r.find_element(By.TAG_NAME, "td").text for r in lens_rows] == sorted(lens, key=int)
    shown = lens_rows[1].find_elements(By.TAG_NAME, "code")
    assert [json.loads(c.text) for c in shown] == [c["token"] for c in lens["1"]]
    # The prompt shows as its own tokens (POST /attention/tokens), none as a placeholder.
    assert not driver.find_elements(By.CSS_SELECTOR, ".tok.unk")
    shot = _screenshot(driver, "attention_viewer_live.png")
    assert shot.stat().st_size > 10_000

    # Save through the page's button (a download), then load that file into a fresh page.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    driver.find_element(By.ID, "attn-save").click()
    saved_file = downloads / "attention_report.json"
    saved = _read_when_written(saved_file)
    assert saved["content"] == held["content"]
    assert len(saved["token_strings"]) == held["prompt_tokens"] + MAX_TOKENS
    driver.get(f"{server}/attention")
    driver.find_element(By.ID, "attn-load").send_keys(str(saved_file))
    assert _wait(driver, _SETTLED) == "loaded", driver.find_element(By.ID, "attn-error").text
    assert not driver.find_elements(By.CSS_SELECTOR, ".tok.unk")
    _select(driver, "select.layer", "1")
    lit = _hover(driver, '.tok.gen[data-gen="4"]')
    assert lit == _positions(api["content"][4]["layers"]["1"])


def test_live_page_head_selection(server: str, browser: Any) -> None:
    """The form's heads and head aggregation reach the request: for the max and the mean over
    chosen heads, hovering a token lights the API's top-k for that head selection (per layer)."""
    from selenium.webdriver.common.by import By

    driver = browser
    for how, heads in (("max", [0, 2]), ("mean", [1, 3])):
        driver.get(f"{server}/attention")
        form = driver.find_element(By.ID, "attn-form")
        values = {"input": QUESTION, "max_tokens": MAX_TOKENS, "attention_tokens_top_k": K,
                  "attention_layers": "0,1", "attention_heads": ",".join(map(str, heads))}  # fmt: skip
        for name, value in values.items():
            field = form.find_element(By.NAME, name)
            field.clear()
            field.send_keys(str(value))
        _select(driver, "select[name=attention_layer_aggregation]", "none")
        _select(driver, "select[name=attention_head_aggregation]", how)
        driver.find_element(By.ID, "attn-run").click()
        phase = _wait(driver, _SETTLED)
        assert phase == "done", driver.find_element(By.ID, "attn-error").text
        held = driver.execute_script("return window.attnState.report")
        assert held["heads"] == heads and held["head_aggregation"] == how
        api = _api_report(server, attention_heads=heads, attention_head_aggregation=how)
        assert [e["token_id"] for e in held["content"]] == [e["token_id"] for e in api["content"]]
        for layer, t in (("0", 1), ("1", 3)):
            _select(driver, "select.layer", layer)
            lit = _hover(driver, f'.tok.gen[data-gen="{t}"]')
            assert lit == _positions(api["content"][t]["layers"][layer]), (how, layer, t)


def _read_when_written(path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if path.exists():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                pass  # still being written
        time.sleep(0.2)
    raise AssertionError(f"the page's Save wrote no {path}")


def test_saved_html_with_heads(server: str, browser: Any, tmp_path: Path) -> None:
    """A save_html file renders with the same renderer; per-head lists get a head selector."""
    from selenium.webdriver.common.by import By

    report = _api_report(server, attention_heads=[0, 1], attention_head_aggregation="none")
    page = save_html(report, tmp_path / "saved.html")
    browser.get(page.as_uri())
    _wait(browser, "return document.querySelectorAll('.tok.gen').length > 0")
    assert not browser.find_elements(By.CSS_SELECTOR, ".attn-fallback")
    heads = [
        o.get_attribute("value")
        for o in browser.find_elements(By.CSS_SELECTOR, "select.head option")
    ]
    assert heads == ["0", "1"]  # no aggregate with "none"
    entry = report["content"][1]
    for layer, head in (("1", "1"), ("1", "0"), ("0", "1")):
        _select(browser, "select.layer", layer)
        _select(browser, "select.head", head)
        lit = _hover(browser, '.tok.gen[data-gen="1"]')
        assert lit == _positions(entry["layers"][layer]["heads"][head])
    _screenshot(browser, "attention_viewer_saved.png")


def test_saved_html_spans_stats_prompt_rows(server: str, browser: Any, tmp_path: Path) -> None:
    """Span bars and the statistics table show the entry's values; prompt positions asked with
    attention_prompt_positions can be hovered like generated tokens."""
    from selenium.webdriver.common.by import By

    report = _api_report(
        server,
        attention_layer_aggregation="mean",
        attention_spans="messages",
        attention_stats=True,
        attention_prompt_positions=[5, 10],
    )
    browser.get(save_html(report, tmp_path / "spans.html").as_uri())
    _wait(browser, "return document.querySelectorAll('.tok.gen').length > 0")
    entry = report["content"][2]
    assert _hover(browser, '.tok.gen[data-gen="2"]') == _positions(entry["top_attention"])
    rows = browser.find_elements(By.CSS_SELECTOR, ".detail table.spans tr")
    shown = {r.find_elements(By.TAG_NAME, "td")[0].text: r for r in rows}
    assert list(shown) == list(entry["span_mass"]) and shown
    for name, row in shown.items():
        value = float(row.find_elements(By.TAG_NAME, "td")[1].text)
        assert abs(value - entry["span_mass"][name]) < 1e-4
    stats = browser.find_elements(By.CSS_SELECTOR, ".detail table.stats td.num")
    names = ("entropy", "sink_mass", "prompt_mass", "completion_mass", "mean_distance")
    assert len(stats) == len(names)
    for td, name in zip(stats, names):
        assert abs(float(td.text) - entry[name]) < 1e-4, name
    prompt_rows = report["prompt_content"]
    assert [e["position"] for e in prompt_rows] == [5, 10]
    lit = _hover(browser, '.tok.qp[data-prompt="1"]')
    assert lit == _positions(prompt_rows[1]["top_attention"])
    assert max(lit) <= 10  # a prompt row's query is its own position
