"""The bad-input catalogue of API teachers: `nanogpt distill` against real HTTP servers on 127.0.0.x.

Each case is a real `http.server` in a thread that answers the way a broken, hostile or slow teacher does;
the command must refuse in one line (`tests/bad_input/__init__.py`), never send the key to another origin, never
cache or print what it should not, and leave no empty OUT.teacher/ behind.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nanogpt import cli
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.distill.api import AnswerCache, ApiClient, ApiConfig, TeacherError, parse_topk, redact
from tests.bad_input import refuse, refuse_subprocess
from tests.local_server import free_port

KEY = "sk-test-9f8e7d6c5b4a"
KEY_ENV = "NANOGPT_TEST_TEACHER_KEY"


# --- a real teacher server ---------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    route: Callable[[Handler, dict[str, Any] | None], None]
    seen: list[dict[str, Any]]

    def _serve(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = None
        self.seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        self.route(self, body)

    do_POST = do_GET = _serve

    def log_message(self, *args: Any) -> None:  # stderr belongs to the command under test
        pass

    def send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Teacher:
    """An HTTP server on `host` (a free port) whose `route(handler, body)` answers; `seen` records requests."""

    def __init__(self, route: Callable[[Handler, dict[str, Any] | None], None], host: str = "127.0.0.1"):
        self.seen: list[dict[str, Any]] = []
        handler = type("H", (Handler,), {"route": staticmethod(route), "seen": self.seen})
        self.server = ThreadingHTTPServer((host, 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, path: str = "/v1/completions") -> int:
        return sum(r["method"] == "POST" and r["path"] == path for r in self.seen)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    started: list[Teacher] = []

    def start(route, host: str = "127.0.0.1") -> Teacher:
        started.append(Teacher(route, host))
        return started[-1]

    yield start
    for t in started:
        t.close()


def scored(prompt: list[int], k: int = 3, logprob: Any = -0.5) -> dict[str, Any]:
    """A valid completions answer scoring `prompt` (echo, max_tokens=0): k alternatives per position."""
    tops = [None] + [{f"token_id:{(t + j) % 50257}": logprob - j for j in range(k)} for t in prompt[1:]]
    return {"choices": [{"logprobs": {"tokens": [f"token_id:{t}" for t in prompt], "top_logprobs": tops}}]}


def good_completions(h: Handler, body: dict[str, Any] | None) -> None:
    h.send(200, scored(body["prompt"]))


@pytest.fixture
def key(monkeypatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def kd(student: Path, data: Path, out: Path, teacher: str, *extra: str) -> list[str]:
    """A one-step distill command line, one try per request, nothing on stderr but an error."""
    return [
        "distill", "--student", str(student), "--data", str(data), "--out", str(out), "--teacher", teacher,
        "--batch-size", "1", "--max-iters", "1", "--eval-iters", "1", "--eval-interval", "1",
        "--device", "cpu", "--no-progress", "--api-key-env", KEY_ENV, "--retries", "0", "--timeout", "5",
        "--concurrency", "1", *extra,
    ]  # fmt: skip


def files_under(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()]


def assert_no_key_anywhere(*roots: Path) -> None:
    for p in files_under(*roots):
        assert KEY.encode() not in p.read_bytes(), p


# --- credentials never cross origins -------------------------------------------------------------------------


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_distill_cross_origin_redirect_never_sends_key(
    code, serve, key, student, small_data, tmp_path, capsys
):
    other = serve(good_completions, host="127.0.0.2")  # another host *and* another port
    first = serve(lambda h, b: h.send(code, {}, {"Location": other.url + "/v1/completions"}))
    out = tmp_path / "kd"
    line = refuse(
        capsys,
        kd(student, small_data, out, f"completions:tiny@{first.url}/v1"),
        names=["another origin", "127.0.0.2"],
        fix="point --teacher at the final URL",
        untouched=[tmp_path / "kd.teacher"],  # absent before, absent after
    )
    assert first.seen and first.seen[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # the key was set
    assert other.seen == []  # the other origin never heard from us, let alone the key
    assert KEY not in line


@pytest.mark.parametrize("code", [307, 308])
def test_distill_same_origin_redirect_is_followed(code, serve, key, student, small_data, tmp_path, capsys):
    def route(h: Handler, body: dict[str, Any] | None) -> None:
        if h.path == "/v1/completions":
            h.send(code, {}, {"Location": "/v2/completions"})
        else:
            good_completions(h, body)

    t = serve(route)
    assert cli.main(kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1")) == 0
    moved = [r for r in t.seen if r["path"] == "/v2/completions"]
    assert moved and all(r["method"] == "POST" and r["body"]["prompt"] for r in moved)  # method, body kept
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in moved)  # same origin: key kept


def test_distill_same_origin_post_to_get_redirect_is_refused(
    serve, key, student, small_data, tmp_path, capsys
):
    t = serve(lambda h, b: h.send(302, {}, {"Location": "/elsewhere"}))
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1"),
        names=["HTTP 302", "POST into a GET"],
        fix="point --teacher at the final URL",
    )
    assert [r["method"] for r in t.seen] == ["POST"]  # no GET followed


# --- nothing cached before it is checked; the cache key is the teacher -----------------------------------------

WINDOW = [464, 2068, 7586, 21831, 18045]
GARBAGE = {
    "html": b"<html><body>502 Bad Gateway</body></html>",
    "string_logprob": "abc",
    "null_logprob": None,
    "nan_string": "NaN",
    "nested_logprob": [[-0.5]],
    "real_nan": float("nan"),
    "too_few_tokens": "short",
    "other_tokenizer": "other",
}


def garbage_answer(kind: str) -> Any:
    if kind == "html":
        return GARBAGE[kind]
    if kind == "too_few_tokens":
        return scored(WINDOW[:2])
    if kind == "other_tokenizer":
        answer = scored(WINDOW)
        answer["choices"][0]["logprobs"]["tokens"][1] = "zzzqxj"  # not one GPT-2 token
        return answer
    answer = scored(WINDOW)
    answer["choices"][0]["logprobs"]["top_logprobs"][2]["token_id:7"] = GARBAGE[kind]
    return answer


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_distill_garbage_answer_is_never_cached(kind, serve, tmp_path):
    """The first answer is garbage, the next good: the garbage is refused, not cached, and asked again."""
    answers = [garbage_answer(kind), scored(WINDOW)]

    def route(h: Handler, body: dict[str, Any] | None) -> None:
        a = answers[min(len(h.seen) - 1, 1)]
        if isinstance(a, bytes):
            h.send(200, a, {"Content-Type": "text/html"})
        else:  # json.dumps writes NaN for a float nan, as some servers do
            h.send(200, json.dumps(a).encode())

    t = serve(route)
    cache = AnswerCache(tmp_path / "cache.sqlite")
    client = ApiClient(ApiConfig(t.url + "/v1", "tiny", retries=0), cache)
    tok = get_tokenizer()

    def ask() -> Any:
        return client.map(
            lambda w: client.post("/completions", {"prompt": w}, lambda a: parse_topk(a, w, 3, tok)), [WINDOW]
        )

    with pytest.raises(TeacherError) as e:
        ask()
    assert "\n" not in str(e.value)
    assert len(cache) == 0
    assert ask()[0].valid.any() and t.posts() == 2 and len(cache) == 1  # asked again, now cached
    assert ask()[0].valid.any() and t.posts() == 2  # from the cache


def test_distill_cache_key_includes_base_url_and_model(serve, tmp_path):
    a = serve(good_completions)
    b = serve(good_completions)
    cache_path = tmp_path / "cache.sqlite"
    tok = get_tokenizer()

    def ask(url: str, model: str) -> None:
        client = ApiClient(ApiConfig(url + "/v1", model, retries=0), AnswerCache(cache_path))
        client.post("/completions", {"prompt": WINDOW}, lambda x: parse_topk(x, WINDOW, 3, tok))

    ask(a.url, "tiny")
    ask(a.url, "tiny")
    assert (a.posts(), b.posts()) == (1, 0)  # the same teacher: answered from the cache
    ask(b.url, "tiny")
    assert b.posts() == 1  # another base URL never replays a's answer
    ask(a.url, "bigger")
    assert a.posts() == 2  # nor does another model at the same URL
    assert len(AnswerCache(cache_path)) == 3


# --- redaction ---------------------------------------------------------------------------------------------

ECHO = f"invalid key {KEY}; you sent Authorization: Bearer {KEY} and x-api-key={KEY}"


@pytest.mark.parametrize("code", [401, 500])
def test_distill_error_body_echoing_key_is_redacted(code, serve, key, student, small_data, tmp_path, capsys):
    t = serve(lambda h, b: h.send(code, {"error": {"message": ECHO}}))
    line = refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1"),
        names=[f"HTTP {code}", "***"],
        fix="check",
    )
    assert KEY not in line and "Bearer ***" in line
    assert_no_key_anywhere(tmp_path)


def test_distill_skip_bad_messages_and_files_are_redacted(serve, key, student, small_data, tmp_path, capsys):
    t = serve(lambda h, b: h.send(401, ECHO.encode(), {"Content-Type": "text/plain"}))
    argv = kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1", "--skip-bad")
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "skipped a teacher answer" in err and KEY not in err and "***" in err
    assert "(--api-key-env names the variable)" in err and "`api_key_env`" not in err  # the CLI's words
    assert (tmp_path / "kd.teacher" / "distill_log.jsonl").is_file()
    assert_no_key_anywhere(tmp_path)


def test_distill_chat_reply_echoing_key_is_redacted_in_files(
    serve, key, student, small_data, tmp_path, capsys
):
    reply = f"Thy key is {KEY}, and thus Authorization: Bearer {KEY} " + "the king doth speak " * 20
    t = serve(lambda h, b: h.send(200, {"choices": [{"message": {"content": reply}}]}))
    extra = ["--prompts", "2", "--prompt-tokens", "8", "--reply-tokens", "40"]
    assert cli.main(kd(student, small_data, tmp_path / "kd", f"chat:tiny@{t.url}/v1", *extra)) == 0
    replies = (tmp_path / "kd.teacher" / "chat_data" / "replies.jsonl").read_text()
    assert "Thy key is ***" in replies
    assert_no_key_anywhere(tmp_path)
    assert KEY not in capsys.readouterr().err


def test_redact_covers_the_key_and_credential_headers():
    text = f'{KEY} "Authorization": "Bearer abc.def" Authorization: Basic dXNlcjpw api_key="k-123" bearer xyz'
    out = redact(text, KEY)
    for secret in (KEY, "abc.def", "dXNlcjpw", "k-123", "xyz"):
        assert secret not in out
    assert json.dumps(KEY)[1:-1] not in redact(json.dumps({"k": KEY}), KEY)


# --- logprobs that are not numbers, through the command ------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", None, "NaN", [[-0.5]], {"x": 1}])
def test_distill_non_numeric_logprobs_are_refused(value, serve, key, student, small_data, tmp_path, capsys):
    def route(h: Handler, body: dict[str, Any] | None) -> None:
        answer = scored(body["prompt"])
        answer["choices"][0]["logprobs"]["top_logprobs"][1]["token_id:3"] = value
        h.send(200, answer)

    t = serve(route)
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1"),
        names="not a number",
        fix="OpenAI-compatible completions API",
        untouched=[tmp_path / "kd.teacher"],  # nothing cached, no empty folder left
    )


def test_distill_token_id_outside_the_vocabulary_is_refused(
    serve, key, student, small_data, tmp_path, capsys
):
    def route(h: Handler, body: dict[str, Any] | None) -> None:
        answer = scored(body["prompt"])
        answer["choices"][0]["logprobs"]["top_logprobs"][1] = {"token_id:99999999": -0.1}
        h.send(200, answer)

    t = serve(route)
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1"),
        names="malformed token",
        fix="chat: teacher",
        untouched=[tmp_path / "kd.teacher"],
    )


# --- numeric teacher flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, want",
    [
        ("--timeout", "-1", "(0, 86400]"),
        ("--timeout", "0", "(0, 86400]"),
        ("--timeout", "nan", "(0, 86400]"),
        ("--timeout", "inf", "(0, 86400]"),
        ("--retries", "-1", "[0, 100]"),
        ("--concurrency", "0", "[1, 256]"),
        ("--top-k", "0", "[1, 50257]"),
        ("--prompts", "0", "[1, 1000000]"),
        ("--prompt-tokens", "2", "[4, 100000]"),
        ("--reply-tokens", "-5", "[1, 1000000]"),
    ],
)
def test_distill_numeric_teacher_flag_out_of_range(
    flag, value, want, key, student, small_data, tmp_path, capsys
):
    argv = kd(student, small_data, tmp_path / "kd", "completions:tiny@http://127.0.0.1:9/v1")
    i = argv.index(flag) if flag in argv else len(argv)
    argv[i : i + 2] = [f"{flag}={value}"]  # the `--flag=value` form, as the issue writes it
    refuse(capsys, argv, names=[flag, "out of range"], fix=want, untouched=[tmp_path / "kd.teacher"])


# --- a teacher that is down ----------------------------------------------------------------------------------


def test_distill_teacher_down_without_checkpoint_says_rerun(key, student, small_data, tmp_path, capsys):
    line = refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@http://127.0.0.1:{free_port()}/v1"),
        names="failed after 1 tries",
        fix="rerun the same command",
        untouched=[tmp_path / "kd.teacher"],  # the failed run leaves no empty teacher folder
    )
    assert "--resume" not in line


def test_distill_teacher_down_with_checkpoint_says_resume(serve, key, student, small_data, tmp_path, capsys):
    t = serve(good_completions)
    spec = f"completions:tiny@{t.url}/v1"
    assert cli.main(kd(student, small_data, tmp_path / "kd", spec)) == 0
    t.close()
    cached = len(AnswerCache(tmp_path / "kd.teacher" / "cache.sqlite"))
    argv = kd(student, small_data, tmp_path / "kd", spec, "--resume")
    argv[argv.index("--max-iters") + 1] = "2"
    refuse(capsys, argv, names="failed after 1 tries", fix="rerun with --resume")
    assert len(AnswerCache(tmp_path / "kd.teacher" / "cache.sqlite")) == cached > 0  # an earlier run's: kept


# --- specs, keys, and servers that misbehave -----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, names, fix",
    [
        ("completions:gpt2", "completions:gpt2", "completions:MODEL@BASE_URL"),
        ("completions:gpt2@127.0.0.1:8000/v1", "completions:gpt2", "MODEL@BASE_URL"),
        ("completions:gpt2@ftp://127.0.0.1/v1", "scheme 'ftp'", "http://"),
        ("chat:gpt2@http:///v1", "no host", "http://HOST:PORT/v1"),
        ("chat:gpt2@http://127.0.0.1:99999/v1", "bad port", "http://HOST:PORT/v1"),
        ("completions:gpt2@http://127.0.0.1/v1?x=1", "?query", "base URL"),
        ("completions:gpt2@http://me:hunter2@127.0.0.1/v1", "user:password", "--api-key-env"),
    ],
)
def test_distill_bad_teacher_spec(spec, names, fix, key, student, small_data, tmp_path, capsys):
    line = refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", spec),
        names=names,
        fix=fix,
        untouched=[tmp_path / "kd.teacher"],
    )
    assert "hunter2" not in line


def test_distill_api_key_env_named_but_unset(monkeypatch, student, small_data, tmp_path, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", "chat:tiny@http://127.0.0.1:9/v1"),
        names=[f"--api-key-env {KEY_ENV}", "not set"],
        fix=f"export {KEY_ENV}=",
        untouched=[tmp_path / "kd.teacher"],
    )


def test_distill_api_key_with_a_newline_is_refused(monkeypatch, student, small_data, tmp_path, capsys):
    monkeypatch.setenv(KEY_ENV, KEY + "\n")
    line = refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", "chat:tiny@http://127.0.0.1:9/v1"),
        names="whitespace or non-ASCII",
        fix="set it to the key alone",
        untouched=[tmp_path / "kd.teacher"],
    )
    assert KEY not in line


@pytest.mark.parametrize(
    "answer, names",
    [
        ({"choices": []}, "no choices[0].message.content"),
        ({"id": "x"}, "no choices[0].message.content"),
        ({"choices": "nope"}, "no choices[0].message.content"),
        ({"choices": [{"message": {"content": "  "}}]}, "empty reply"),
        ({"choices": [{"message": {"content": None}}]}, "empty reply"),
    ],
)
def test_distill_chat_teacher_without_a_reply(
    answer, names, serve, key, student, small_data, tmp_path, capsys
):
    t = serve(lambda h, b: h.send(200, answer))
    refuse(
        capsys,
        kd(
            student,
            small_data,
            tmp_path / "kd",
            f"chat:tiny@{t.url}/v1",
            "--prompts",
            "1",
            "--prompt-tokens",
            "8",
        ),
        names=names,
        fix=["check the model name" if "choices" in names else "raise --reply-tokens"],
        untouched=[tmp_path / "kd.teacher"],
    )


def test_distill_http_200_with_html_is_refused(serve, key, student, small_data, tmp_path, capsys):
    t = serve(
        lambda h, b: h.send(
            200, b"<!doctype html><html><title>Login</title></html>", {"Content-Type": "text/html"}
        )
    )
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}"),
        names=["not JSON", "<!doctype html>"],
        fix="point --teacher at the API's base URL",
        untouched=[tmp_path / "kd.teacher"],
    )


def close_at_once(h: Handler, body: dict[str, Any] | None) -> None:
    h.close_connection = True  # no status line at all


def close_mid_answer(h: Handler, body: dict[str, Any] | None) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    h.wfile.write(b'{"choices": [')  # then the connection closes: an incomplete read
    h.close_connection = True


@pytest.mark.parametrize("route", [close_at_once, close_mid_answer], ids=["at_once", "mid_answer"])
def test_distill_server_closes_the_connection(route, serve, key, student, small_data, tmp_path, capsys):
    t = serve(route)
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1"),
        names="failed after 1 tries",
        fix="check it is up",
        untouched=[tmp_path / "kd.teacher"],
    )


def test_distill_slow_teacher_beyond_timeout(serve, key, student, small_data, tmp_path, capsys):
    def slow(h: Handler, body: dict[str, Any] | None) -> None:
        time.sleep(1.5)
        good_completions(h, body)

    t = serve(slow)
    argv = kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1")
    argv[argv.index("--timeout") + 1] = "0.3"
    refuse(capsys, argv, names=["no answer within --timeout 0.3 s"], fix="raise --timeout")


def test_distill_corrupt_cache_file_is_refused_and_kept(serve, key, student, small_data, tmp_path, capsys):
    t = serve(good_completions)
    folder = tmp_path / "kd.teacher"
    folder.mkdir()
    (folder / "cache.sqlite").write_bytes(b"this is not a database, it is a text file" * 50)
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1"),
        names=["teacher cache", "cache.sqlite"],
        fix="give another --cache-dir",
        untouched=[folder / "cache.sqlite"],
    )
    assert t.seen == []


def test_distill_cache_dir_that_is_a_file_is_refused(key, student, small_data, tmp_path, capsys):
    (tmp_path / "cache").write_text("not a folder")
    refuse(
        capsys,
        kd(
            student,
            small_data,
            tmp_path / "kd",
            "chat:tiny@http://127.0.0.1:9/v1",
            "--cache-dir",
            str(tmp_path / "cache"),
        ),
        names="is a file",
        fix="give another --cache-dir",
        untouched=[tmp_path / "cache"],
    )


def test_distill_unreadable_teacher_settings_on_resume(key, student, small_data, tmp_path, capsys):
    folder = tmp_path / "kd.teacher"
    folder.mkdir()
    (folder / "distill.json").write_text("{not json")
    refuse(
        capsys,
        kd(student, small_data, tmp_path / "kd", "chat:tiny@http://127.0.0.1:9/v1", "--resume"),
        names=["teacher settings", "unreadable"],
        fix="restore that file",
        untouched=[folder],
    )


def test_distill_failed_run_leaves_cache_with_answers(serve, key, student, small_data, tmp_path, capsys):
    """The first window's answer is good, the second is garbage: the run fails, the paid answer is kept."""
    answers = iter([None, "bad"])

    def route(h: Handler, body: dict[str, Any] | None) -> None:
        if next(answers, "bad") is None:
            good_completions(h, body)
        else:
            h.send(200, b"oops", {"Content-Type": "text/plain"})

    t = serve(route)
    argv = kd(student, small_data, tmp_path / "kd", f"completions:tiny@{t.url}/v1", "--batch-size", "2")
    refuse(capsys, argv, names="not JSON", fix="base URL")
    with sqlite3.connect(tmp_path / "kd.teacher" / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 1


def test_distill_hand_edited_teacher_settings_on_resume(key, student, small_data, tmp_path, capsys):
    folder = tmp_path / "kd.teacher"
    folder.mkdir()
    (folder / "distill.json").write_text(
        json.dumps({"teacher": "chat:tiny@http://127.0.0.1:9/v1", "top_k": "20"})
    )
    argv = kd(student, small_data, tmp_path / "kd", "chat:tiny@http://127.0.0.1:9/v1", "--resume")
    refuse(capsys, argv, names=["--top-k '20'", "out of range"], fix="give an integer", untouched=[folder])


def test_distill_cross_origin_redirect_in_a_fresh_process(serve, student, small_data, tmp_path):
    """The same refusal from a real `python -m nanogpt distill`: one line, exit 2, the key kept home."""
    other = serve(good_completions, host="127.0.0.2")
    first = serve(lambda h, b: h.send(308, {}, {"Location": other.url + "/v1/completions"}))
    argv = kd(student, small_data, tmp_path / "kd", f"completions:tiny@{first.url}/v1")
    line = refuse_subprocess(
        argv,
        names=["another origin", "127.0.0.2"],
        fix="point --teacher at the final URL",
        untouched=[tmp_path / "kd.teacher"],
        env={KEY_ENV: KEY},
        timeout=60,
    )
    assert line.startswith("nanogpt distill: error:") and KEY not in line
    assert first.seen and other.seen == []
