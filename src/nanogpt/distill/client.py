"""The HTTP side of API teachers: a JSON client with retries, its answer cache, and key redaction.

Three rules, because the client holds a credential and pays for every answer:

- the key goes to the teacher's own origin only. urllib's stock redirect handler re-sends `Authorization`
  to whatever host a `Location` names and turns a POST into a GET on 301/302/303; here a 307/308 within
  the origin is followed (method, body and key kept) and every other redirect is refused with one line;
- an answer is cached only after the caller's `check` accepted it (garbage is asked again next time), and
  the cache key holds the base URL and the model, so another teacher never replays this one's answers;
- every text made from what a server or a request said goes through `redact` (the configured key, and any
  Authorization/Bearer/api-key value) before it reaches an exception, stderr, a log or a file.

Refusals name settings, not flags: a `SettingError` marks a setting as `teacher`, `timeout`... and the command
that took it from a flag says the flag there (`SettingError.with_flags`); `TeacherError` is one too.

    client = ApiClient(ApiConfig("http://127.0.0.1:8000/v1", "gpt2"), AnswerCache("cache.sqlite"))
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import math
import os
import re
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from nanogpt.errors import SettingError, UserError

T_ = TypeVar("T_")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_WAIT_S = 60.0  # a Retry-After longer than this is capped
MAX_TIMEOUT_S = 86400.0  # a day; larger values overflow the socket layer's timeval
REDACTED = "***"
EXAMPLE_SPEC = "completions:gpt2@http://127.0.0.1:8000/v1"


class TeacherError(SettingError):
    """A teacher answer could not be had or used (one line; `skip_bad` counts and skips it instead).

    A `SettingError` of the teacher (or of `setting`, when another one is the fix), so that a command says the
    flags its message marks; the class, not the setting, is what the training loop acts on.
    """

    def __init__(self, message: str, setting: str = "teacher") -> None:
        super().__init__(setting, message)

    def __reduce__(self) -> tuple[type[TeacherError], tuple[Any, ...]]:
        return type(self), (str(self), self.setting)


class TeacherDown(TeacherError):
    """The teacher did not answer within the retries: the run stops even with `skip_bad`."""


# --- redaction -----------------------------------------------------------------------------------------------

# a header or JSON field that carries a credential: `Authorization: Bearer x`, `"api_key": "x"`, `x-api-key=x`
_SECRET_FIELD = re.compile(
    r"(?i)((?:proxy-)?authorization|x-api-key|api[-_]?key)(\\?[\"']?\s*[:=]\s*\\?[\"']?)"
    r"((?:bearer|basic|token)\s+)?[^\s\"'\\,;}&]+"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"'\\,;}&]+")


def redact(text: str, key: str | None = None) -> str:
    """`text` with `key` (as is, JSON-escaped, URL-quoted) and every credential-looking value replaced by ***."""
    if key:
        for form in {key, json.dumps(key)[1:-1], urllib.parse.quote(key, safe="")}:
            text = text.replace(form, REDACTED)
    text = _SECRET_FIELD.sub(lambda m: m[1] + m[2] + (m[3] or "") + REDACTED, text)
    return _BEARER.sub(lambda m: f"{m[1]} {REDACTED}", text)


def _redact_json(value: Any, key: str | None) -> Any:
    """A parsed JSON answer with `redact` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return redact(value, key)
    if isinstance(value, list):
        return [_redact_json(v, key) for v in value]
    if isinstance(value, dict):
        return {redact(str(k), key): _redact_json(v, key) for k, v in value.items()}
    return value


# --- URLs and origins ----------------------------------------------------------------------------------------


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in; ("", "", None) if unparsable."""
    try:
        p = urllib.parse.urlsplit(url)
        scheme = p.scheme.lower()
        return scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return "", "", None


def _origin_text(url: str) -> str:
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}" if host else repr(url)


def check_base_url(url: str) -> str:
    """A teacher's base URL, without a trailing slash; one-line UserError for anything urllib would trip on."""
    try:
        p = urllib.parse.urlsplit(url)
        port = p.port  # ValueError for a port that is not a number in 0..65535
    except ValueError:
        p, port = None, None
    if p is None:
        raise UserError(f"teacher URL {url!r} has a bad port; write http://HOST:PORT/v1, e.g. {EXAMPLE_SPEC}")
    if p.scheme.lower() not in ("http", "https"):
        raise UserError(
            f"teacher URL {url!r} has scheme {p.scheme or 'none'!r}; use http:// or https://, e.g. {EXAMPLE_SPEC}"
        )
    if p.username is not None or p.password is not None:
        shown = urllib.parse.urlunsplit(p._replace(netloc=f"{REDACTED}@{p.netloc.rpartition('@')[2]}"))
        raise SettingError(
            "teacher",
            f"teacher URL {shown} holds a user:password part; put the key in the env var named by `api_key_env`",
        )
    if not p.hostname or port == 0:
        raise UserError(f"teacher URL {url!r} has no host; write http://HOST:PORT/v1, e.g. {EXAMPLE_SPEC}")
    if p.query or p.fragment:
        raise UserError(
            f"teacher URL {url!r} has a ?query or #fragment; give the API's base URL, e.g. {EXAMPLE_SPEC}"
        )
    return url.rstrip("/")


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a 307/308 within the request's origin, method, body and key kept; refuses any other redirect."""

    def __init__(self, key: str | None) -> None:
        self.key = key

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if origin(newurl) != origin(req.full_url):
            fp.close()
            raise SettingError(
                "teacher",
                redact(
                    f"teacher API {req.full_url} redirects (HTTP {code}) to another origin, "
                    f"{_origin_text(newurl)}; the API key is never sent there: if you trust it, point `teacher` "
                    "at the final URL",
                    self.key,
                ),
            )
        if code not in (307, 308):
            fp.close()
            raise SettingError(
                "teacher",
                redact(
                    f"teacher API {req.full_url} redirects (HTTP {code}) to {newurl}, which turns a POST into a "
                    "GET; point `teacher` at the final URL",
                    self.key,
                ),
            )
        return urllib.request.Request(
            newurl,
            data=req.data,
            headers=dict(req.headers),
            method=req.get_method(),
            origin_req_host=req.origin_req_host,
            unverifiable=True,
        )


# --- the answer cache ----------------------------------------------------------------------------------------


def request_key(base_url: str, model: str, path: str, body: dict[str, Any]) -> str:
    """A stable hash of one request: the teacher (base URL, model), the endpoint path and the JSON body."""
    blob = {"base_url": base_url, "model": model, "path": path, "body": body}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


class AnswerCache:
    """SQLite table key -> (request, response JSON) of checked answers; every `put` is committed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers "
                "(key TEXT PRIMARY KEY, request TEXT, response TEXT, created REAL)"
            )
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise SettingError(
                "cache_dir",
                f"teacher cache {self.path} cannot be used ({e}); move it away or give another `cache_dir`",
            ) from None
        self.hits = self.misses = 0

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM answers WHERE key = ?", (key,)).fetchone()
            self.hits, self.misses = self.hits + (row is not None), self.misses + (row is None)
        return None if row is None else json.loads(row[0])

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
                (key, json.dumps(request), json.dumps(response), time.time()),
            )
            self._db.commit()

    def drop(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM answers WHERE key = ?", (key,))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])


def cached_answers(path: str | Path) -> int:
    """How many answers the cache file at `path` holds (0 when it is absent or unreadable), without creating it."""
    if not Path(path).is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
    except sqlite3.DatabaseError:
        return 0


# --- the client ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1 or https://api.groq.com/openai/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this env var; absent -> no auth header
    concurrency: int = 4
    timeout: float = 60.0  # seconds per request
    retries: int = 5  # after the first try
    backoff: float = 1.0  # first wait; doubles each retry (Retry-After wins when given)
    key_required: bool = False  # True when the caller named api_key_env: an unset variable is then an error

    def __post_init__(self) -> None:
        for name, value, ok, want in (
            (
                "timeout",
                self.timeout,
                0 < self.timeout <= MAX_TIMEOUT_S,
                f"seconds in (0, {MAX_TIMEOUT_S:g}]",
            ),
            ("retries", self.retries, 0 <= self.retries <= 100, "an integer in [0, 100]"),
            ("concurrency", self.concurrency, 1 <= self.concurrency <= 256, "an integer in [1, 256]"),
            ("backoff", self.backoff, 0 <= self.backoff <= MAX_WAIT_S, f"seconds in [0, {MAX_WAIT_S:g}]"),
        ):
            if not (math.isfinite(value) and ok):  # NaN fails every comparison: checked explicitly
                shown = f"`{name}`" if name != "backoff" else name  # backoff is no command's flag
                raise SettingError(name, f"{shown} {value} is out of range: give {want}")

    def api_key(self) -> str | None:
        """The key from `api_key_env` (None: no auth header); refuses an unset required one or a malformed one."""
        key = os.environ.get(self.api_key_env) or None
        if key is None and self.key_required:
            raise SettingError(
                "api_key_env",
                f"`api_key_env` {self.api_key_env}: that environment variable is not set; export "
                f"{self.api_key_env}=<your key>, or leave out `api_key_env` for a teacher without auth",
            )
        if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
            raise UserError(
                f"the API key in ${self.api_key_env} holds whitespace or non-ASCII characters (a pasted newline?); "
                "set it to the key alone"
            )
        return key


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date (None if absent/unparsable)."""
    if not value:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delays(cfg: ApiConfig) -> list[float]:
    """The waits between tries when no Retry-After is given: backoff, 2x, 4x ... (one per retry)."""
    return [min(cfg.backoff * 2**i, MAX_WAIT_S) for i in range(cfg.retries)]


def _rerun_same_command() -> str:
    return "then rerun the same command (answers already received are cached)"


class ApiClient:
    """POSTs JSON to an OpenAI-compatible API through the cache, with retries and a concurrency bound.

    `down_hint()` ends the message of a teacher that stays down (the caller knows whether a checkpoint
    exists to resume); `wording(e)` is how a skipped answer's refusal is printed (a command puts its flags
    where the message marks a setting).
    """

    def __init__(
        self,
        cfg: ApiConfig,
        cache: AnswerCache | None = None,
        sleep: Callable[[float], None] = time.sleep,
        down_hint: Callable[[], str] = _rerun_same_command,
        wording: Callable[[SettingError], str] = str,
    ) -> None:
        self.cfg, self.cache, self._sleep, self.down_hint = cfg, cache, sleep, down_hint
        self.wording = wording
        self._key = cfg.api_key()
        self._opener = urllib.request.build_opener(_SameOriginRedirects(self._key))
        self.sent = 0  # requests that reached the network (cache misses, counting retries)
        self.skipped = 0

    def redact(self, text: str) -> str:
        return redact(text, self._key)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "nanogpt-distill"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    @overload
    def post(self, path: str, body: dict[str, Any], check: Callable[[dict[str, Any]], T_]) -> T_: ...

    @overload
    def post(self, path: str, body: dict[str, Any], check: None = None) -> dict[str, Any]: ...

    def post(
        self, path: str, body: dict[str, Any], check: Callable[[dict[str, Any]], Any] | None = None
    ) -> Any:
        """`check(answer)` for the JSON answer to `body` at base_url + path, from the cache or fetched.

        A fetched answer is cached only once `check` returned (it raises TeacherError on garbage); a cached
        answer that fails `check` (written before answers were checked) is dropped and asked again.
        """
        check_ = check or (lambda answer: answer)
        key = request_key(self.cfg.base_url, self.cfg.model, path, body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            try:
                return check_(hit)
            except TeacherError:
                self.cache.drop(key)
        answer = self._fetch(path, body)
        result = check_(answer)
        if self.cache is not None:
            self.cache.put(key, body, answer)
        return result

    def _fetch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.cfg.base_url + path
        data = json.dumps(body).encode()
        delays = backoff_delays(self.cfg)
        reason = ""
        for attempt in range(self.cfg.retries + 1):
            wait: float | None = None
            req = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
            self.sent += 1
            try:
                with self._opener.open(req, timeout=self.cfg.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                detail = self.redact(_error_body(e))[:200]
                if e.code not in RETRY_STATUS:
                    raise TeacherError(
                        f"teacher API {url} answered HTTP {e.code}: {detail}; {self._fix_for(e.code)}"
                    ) from None
                reason, wait = f"HTTP {e.code}: {detail}", retry_after_seconds(e.headers.get("Retry-After"))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                # OSError: refused, reset, timed out; HTTPException: a connection closed mid-answer, not HTTP
                cause = getattr(e, "reason", e)
                if isinstance(cause, TimeoutError) or "timed out" in str(cause):
                    reason = (
                        f"no answer within `timeout` {self.cfg.timeout:g} s; raise `timeout` if it is slow"
                    )
                else:
                    reason = self.redact(str(cause) or type(cause).__name__)
            else:
                return self._decode(url, raw)
            if attempt < self.cfg.retries:
                self._sleep(min(wait if wait is not None else delays[attempt], MAX_WAIT_S))
        raise TeacherDown(
            f"teacher API {url} failed after {self.cfg.retries + 1} tries ({reason}); check it is up, "
            + self.down_hint()
        )

    def _decode(self, url: str, raw: bytes) -> dict[str, Any]:
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            shown = self.redact(raw.decode("utf-8", "replace"))[:80]
            raise TeacherError(
                f"teacher API {url} answered with something that is not JSON ({shown!r}); point `teacher` at "
                "the API's base URL (e.g. http://HOST:PORT/v1)"
            ) from None
        if not isinstance(answer, dict):
            raise TeacherError(f"teacher API {url} answered JSON that is not an object; is it an OpenAI API?")
        return _redact_json(answer, self._key)

    def _fix_for(self, code: int) -> str:
        if code in (401, 403):
            return f"check the key in ${self.cfg.api_key_env} (`api_key_env` names the variable)"
        if code in (404, 405):
            return (
                "check the model name and that `teacher`'s URL is the API's base (e.g. http://HOST:PORT/v1)"
            )
        return "check the teacher's request limits and logs"

    def map(self, fn: Callable[[T_], Any], items: Sequence[T_], skip_bad: bool = False) -> list[Any]:
        """fn over items, `concurrency` at a time, in order; with skip_bad a bad answer gives None.

        A TeacherDown always stops; every other TeacherError leaves here redacted (its text may quote the
        server: a token, a reply).
        """

        def one(item: T_) -> Any:
            try:
                return fn(item)
            except TeacherDown:
                raise
            except TeacherError as e:
                redacted = TeacherError(self.redact(str(e)), e.setting)
                if not skip_bad:
                    raise redacted from None
                self.skipped += 1
                print(
                    f"nanogpt distill: skipped a teacher answer ({self.skipped} so far): {self.wording(redacted)}",
                    file=sys.stderr,
                )
                return None

        if self.cfg.concurrency <= 1 or len(items) <= 1:
            return [one(i) for i in items]
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(one, items))


def _error_body(e: urllib.error.HTTPError) -> str:
    """The message of an HTTP error answer (OpenAI's {"error": {"message": ...}} or the raw body), unredacted."""
    try:
        raw = e.read() or b""
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        body = json.loads(raw or b"{}")
        err = body.get("error") if isinstance(body, dict) else None
        text = str((err.get("message") if isinstance(err, dict) else err) or body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        text = raw.decode("utf-8", "replace")
    return " ".join(text.split()) or (e.reason if isinstance(e.reason, str) else "no detail")  # one line
