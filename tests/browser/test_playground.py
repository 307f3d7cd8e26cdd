"""The playground in a real browser: Debian's headless Chromium driven by Playwright against a real `nanogpt serve`
of a tiny trained run (marker `browser`; `scripts/test_browser.sh` installs Chromium and runs them).

Every test reads what the page drew as data (`window.playground`, the SVG's and canvas's data attributes), not
only pixels, and every request the browser makes is checked: anything not for 127.0.0.1 is aborted and
recorded, and the suite asserts none was attempted (the page works with the network off). Screenshots of
each view go to the test's artifacts folder, and to $NANOGPT_SCREENSHOTS when set (the docs' images).
`NANOGPT_PLAYGROUND_RUN` serves that run folder instead of training the tiny one (for better screenshots).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.local_server import Server
from tests.serve.test_playground import train_tiny_run

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright's own browser download cannot work offline
KEY = "sk-browser-test"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory) -> Path:
    if os.environ.get("NANOGPT_PLAYGROUND_RUN"):
        return Path(os.environ["NANOGPT_PLAYGROUND_RUN"])
    # a long context: a stream of a thousand tokens is still running when the test presses Escape
    return train_tiny_run(small_data, tmp_path_factory.mktemp("browser") / "run", context_length=1024)


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    s = Server(run, tmp_path_factory.mktemp("browser_log") / "serve.log", key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def screenshot(page, shots: Path, name: str, full_page: bool = False) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    if os.environ.get("NANOGPT_SCREENSHOTS"):
        out = Path(os.environ["NANOGPT_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / path.name)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[browser]'")
    assert Path(CHROMIUM).is_file(), "Chromium missing: scripts/test_browser.sh installs Debian's chromium"
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def offsite() -> list[str]:
    """Every request the pages tried to send anywhere but 127.0.0.1 (each was aborted)."""
    tried: list[str] = []
    yield tried
    assert tried == [], f"the page tried to reach the network: {tried}"


def open_page(browser, url: str, offsite: list[str], viewport=DESKTOP, bypass_csp: bool = True):
    # bypass_csp: Playwright's wait_for_function evaluates strings, which the page's own CSP forbids
    # (test_the_page_runs_under_its_own_csp loads it without the bypass)
    context = browser.new_context(viewport=viewport, bypass_csp=bypass_csp)

    def guard(route):
        if route.request.url.startswith("http://127.0.0.1:"):
            route.continue_()
        else:
            offsite.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.errors = errors
    page.goto(url + "/")
    return page


@pytest.fixture(scope="module")
def page(browser, server, offsite):
    page = open_page(browser, server.url, offsite)
    page.wait_for_function("document.getElementById('status').textContent.includes('API key')")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")  # `change`: the key is kept in memory and the story reloads
    page.wait_for_function("window.playground.story.story !== null")
    yield page
    assert [e for e in page.errors if "401" not in e] == []  # the 401 before the key was typed is expected
    page.context.close()


def state(page, expr: str):
    return page.evaluate(f"() => {{ {expr} }}")


def generate(page, prompt: str, max_tokens: int, seed: int = 1) -> None:
    page.click("#tab-generate")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", str(seed))
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")  # Enter generates
    page.wait_for_function(
        "window.playground.generate.finish !== null && !window.playground.generate.running"
    )


def test_generate_streams_coloured_tokens_with_alternatives(page, shots):
    generate(page, "ROMEO. What light", 24)
    tokens = state(page, "return window.playground.generate.tokens")
    assert 1 <= len(tokens) <= 24 and all(0 < t["p"] <= 1 for t in tokens)
    spans = page.locator("#output .tok")
    assert spans.count() == len(tokens)
    colours = spans.evaluate_all("s => s.map(e => getComputedStyle(e).backgroundColor)")
    assert all(c not in ("", "rgba(0, 0, 0, 0)") for c in colours)  # every token painted by its probability
    painted = spans.evaluate_all(
        "s => s.map(e => { const probe = document.createElement('span');"
        " probe.style.background = window.playground.probColour(Number(e.dataset.p));"
        " return probe.style.backgroundColor === e.style.backgroundColor; })"
    )
    assert all(painted)  # by the colour scale of its own probability
    legend = page.locator(".swatch").evaluate_all("s => s.map(e => getComputedStyle(e).backgroundColor)")
    assert len(set(legend)) == 5  # the scale tells 2%, 10%, 30%, 60% and 95% apart
    assert [float(v) for v in spans.evaluate_all("s => s.map(e => e.dataset.p)")] == pytest.approx(
        [t["p"] for t in tokens], abs=1e-6
    )
    spans.nth(1).hover()
    alts = page.locator("#alts")
    alts.wait_for(state="visible")
    items = alts.locator("li")
    assert items.count() == len(tokens[1]["top"]) >= 15  # 20 asked; tokens that print alike merge
    assert re.search(r"\d+(\.\d)?%|<0\.1%", items.nth(0).inner_text())
    screenshot(page, shots, "generate-desktop")
    # pick an alternative that is not the drawn token: the text continues from it
    pick = next(
        i for i, (t, _) in enumerate(sorted(tokens[1]["top"], key=lambda a: -a[1])) if t != tokens[1]["text"]
    )
    chosen = alts.locator("button.alt").nth(pick)
    alt_text = state(
        page, "return [...document.querySelectorAll('#alts .alt-token')].map(e => e.textContent)"
    )[pick]
    chosen.click()
    page.wait_for_function(
        "window.playground.generate.tokens[1].picked && !window.playground.generate.running"
    )
    after = state(page, "return window.playground.generate.tokens")
    assert after[0]["text"] == tokens[0]["text"] and after[1]["picked"]
    shown = after[1]["text"].replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
    assert shown == alt_text and len(after) > 2  # it continued after the picked token
    screenshot(page, shots, "alternative-picked")


def test_stop_cancels_the_stream_and_frees_the_slot(page, server):
    page.fill("#max-tokens", "2000")
    page.fill("#seed", "")
    page.fill("#prompt", "Once upon a time")
    page.click("#generate")
    page.wait_for_function("window.playground.generate.tokens.length >= 3")
    page.keyboard.press("Escape")  # Escape stops
    page.wait_for_function("window.playground.generate.running === null")
    assert "Stopped" in page.inner_text("#status")
    assert state(page, "return window.playground.generate.finish") is None
    deadline = time.time() + 30
    while True:  # the engine drops the job before its next step
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
        if re.search(r"^nanogpt_active_sequences 0\.0$", metrics, re.M):
            break
        assert time.time() < deadline, "the stopped request still holds a slot"
        time.sleep(0.1)
    assert "POST /v1/completions 499" in server.log.read_text()  # the server saw the client leave


def test_step_mode_shows_both_distributions(page, shots):
    page.click("#clear")
    page.fill("#prompt", "The capital of France is")
    page.fill("#top-k", "5")
    page.fill("#temperature", "0.8")
    page.click("#step")
    page.wait_for_function("window.playground.generate.steps === 1 && !window.playground.generate.running")
    page.click("#step")
    page.wait_for_function("window.playground.generate.steps === 2 && !window.playground.generate.running")
    assert page.is_visible("#step-panel")
    model = page.eval_on_selector("#model-bars", "e => JSON.parse(e.dataset.bars)")
    sampled = page.eval_on_selector("#sampled-bars", "e => JSON.parse(e.dataset.bars)")
    assert "before temperature" in page.inner_text("#model-caption")
    assert "after temperature 0.8, top-k 5" in page.inner_text("#sampled-caption")
    assert "exact" in page.inner_text("#sampled-caption")  # top-k 5 <= the 20 alternatives
    assert len(sampled) <= 5 and sum(p for _, p in sampled) == pytest.approx(1.0, abs=1e-6)
    assert model[-1][0] is None and sum(p for _, p in model) <= 1 + 1e-6  # the top 12 drawn, then "the rest"
    top_model = [t for t, _ in model[:5]]
    assert [t for t, _ in sampled] == top_model[: len(sampled)]  # the same tokens, sharper
    assert sampled[0][1] >= model[0][1]
    assert len(state(page, "return window.playground.generate.tokens")) == 2
    screenshot(page, shots, "step-desktop", full_page=True)
    page.fill("#top-k", "")
    page.fill("#temperature", "1")


def test_keyboard_tab_to_tokens_enter_picks(page):
    generate(page, "In the field of machine learning,", 8)
    page.focus("#clear")
    for _ in range(20):  # Tab from the controls into the text
        page.keyboard.press("Tab")
        if state(page, "return document.activeElement.classList.contains('tok')"):
            break
    else:
        pytest.fail("Tab never reached a token")
    assert page.is_visible("#alts")  # focus shows the alternatives
    first = state(page, "return window.playground.generate.tokens[0].text")
    page.keyboard.press("Enter")  # into the alternatives
    assert state(page, "return document.activeElement.classList.contains('alt')")
    page.keyboard.press("ArrowDown")  # stays put: a button list, Tab moves on
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the second alternative
    page.wait_for_function(
        "window.playground.generate.tokens[0].picked && !window.playground.generate.running"
    )
    assert state(page, "return window.playground.generate.tokens.length") >= 1
    assert isinstance(first, str)


def test_chat_mode_streams_a_reply(page):
    page.check("input[value=chat]")
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "Who are you?")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "window.playground.generate.chat.length === 2 && !window.playground.generate.running"
    )
    assert page.locator("#chat-log .msg.user").inner_text().endswith("Who are you?")
    assert page.locator("#chat-log .msg.assistant .tok").count() >= 1
    page.check("input[value=completion]")


def test_attention_heatmap(page, shots):
    page.click("#tab-attention")
    prompt = "The capital of France is Paris. The capital of Italy is"
    page.fill("#att-prompt", prompt)
    page.click("#att-go")
    page.wait_for_function("window.playground.attention.drawn !== null")
    drawn = state(page, "return window.playground.attention.drawn")
    T = len(drawn["tokens"])
    assert "".join(drawn["tokens"]) == prompt and T == 12
    assert page.eval_on_selector("#heatmap", "e => [e.dataset.rows, e.dataset.cols]") == [str(T), str(T)]
    m = drawn["matrix"]  # the average over heads by default
    assert len(m) == T and all(len(r) == T for r in m)
    assert all(sum(r) == pytest.approx(1.0, abs=1e-4) for r in m)
    assert all(m[i][j] == 0 for i in range(T) for j in range(i + 1, T))
    screenshot(page, shots, "attention-desktop")
    page.select_option("#att-layer", "1")
    page.select_option("#att-head", "2")
    one = state(page, "return window.playground.attention.drawn")
    assert (one["layer"], one["head"]) == (1, "2")
    data = state(page, "return window.playground.attention.data.attention")
    assert one["matrix"] == data[1][2]
    heads = data[1]
    page.select_option("#att-head", "avg")
    avg = state(page, "return window.playground.attention.drawn.matrix")
    assert avg[5][3] == pytest.approx(sum(h[5][3] for h in heads) / len(heads))


def test_run_story_with_the_loss_curve(page, shots, run):
    page.click("#tab-story")
    page.wait_for_selector("#loss-curve path.train")
    n = sum(1 for line in (run / "log.jsonl").read_text().splitlines() if line.strip())
    assert page.eval_on_selector("#loss-curve", "e => Number(e.dataset.points)") == n
    assert page.locator("#loss-curve circle.val-dot").count() >= 2
    facts = page.inner_text("#facts")
    assert "unique" in facts and "counting the tied embedding twice" in facts
    assert "held-out perplexity" in facts and "train:" in page.inner_text("#lineage")
    screenshot(page, shots, "story-desktop")


def test_phone_width(browser, server, offsite, shots):
    page = open_page(browser, server.url, offsite, viewport=PHONE)
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_function("window.playground.story.story !== null")
    generate(page, "Once upon a time", 20)
    # nothing wider than the screen: every view reflows to one column
    assert state(page, "return document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, shots, "generate-phone", full_page=True)
    page.click("#tab-story")
    page.wait_for_selector("#loss-curve path.train")
    assert state(page, "return document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, shots, "story-phone", full_page=True)
    page.context.close()


def test_the_page_runs_under_its_own_csp_and_says_when_the_server_is_busy_or_gone(browser, tmp_path, offsite):
    """No key on this server (the page needs none), a queue of 0 (every job a 429), then no server at all."""
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.checkpoint import save_model
    from tests.tiny import tiny_config

    ckpt = save_model(tmp_path / "ckpt", NanoGPTLMHeadModel(tiny_config()))
    s = Server(ckpt, tmp_path / "serve.log", extra=["--max-queue", "0"])
    try:
        page = open_page(browser, s.url, offsite, bypass_csp=False)
        page.locator("#model-line").filter(has_text="2 layers").wait_for()  # the story loaded, no key asked
        page.click("#tab-attention")
        page.click("#att-go")  # a job like any other: with no room in the queue, a 429
        page.locator("#status").filter(has_text="queue is full").wait_for()
        assert "429" in page.inner_text("#status")
        assert not page.is_disabled("#att-go")  # usable again: nothing hangs
        page.click("#tab-generate")
    finally:
        s.stop()
    page.click("#generate")
    page.locator("#status").filter(has_text="cannot be reached").wait_for()
    assert [e for e in page.errors if "429" not in e and "ERR_CONNECTION_REFUSED" not in e] == []
    page.context.close()
