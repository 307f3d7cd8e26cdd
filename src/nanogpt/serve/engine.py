"""The serving engine: one scheduler thread owns the model and advances every stream in one batched forward.

Requests (`Job`) wait in a bounded queue (`submit` raises `QueueFull` beyond `max_queue`). Between steps
the scheduler admits as many as `max_batch` allows, and each iteration then does, in order:

1. scoring: the prompts of jobs that asked for their log-probs (`score_prompt`, what a distillation teacher
   sends as `echo=true, max_tokens=0, logprobs=k`), right-padded into one full forward;
2. prefill: the next chunk (`prefill_chunk` tokens at most) of every prompt still being read, left-padded
   into one forward, so a long prompt is read over several steps and never stalls the streams;
   or, every other step while both wait, the next `prefill_chunk` tokens of an attention job (`Job.attention`:
   the playground's heatmaps), read through the model's eager attention into a KV cache of its own, so
   looking at attention never slows the streams more than reading a prompt does;
3. decode: one token for every stream, in one forward over the `SlotKVCache` (each row its own length).

Sampling is per row (`infer.sampling.sample_rows`): each job has its own `SamplingParams` and generator, so
a seeded job draws the same tokens alone or in a crowd. A cancelled job (`Handle.cancel`: the client went
away) or one past its deadline leaves before the next step. Generation ends at `<|endoftext|>` ("stop"),
at `max_tokens` or at the end of the context ("length"); the window never slides here.

Active sequences live in consecutive cache slots, streams first, then prompts being read, so every
forward reads a slice of the cache; when one leaves, the last one moves into its slot.

`Engine.stats` (`EngineStats`) counts where the scheduler's time went, phase by phase, and the shape of its
decode steps (rows, keys read against keys needed); `GET /metrics` reports it and `nanogpt bench --serve`
turns it into each level's profile.

Events go to the job's `Handle`: `PromptScores` (once, if asked), one `Token` per new token, then one
`Finished`; an attention job gets one `AttentionMaps`, then `Finished("stop")`. A handle is read with `for ev in handle` (threads) or `async for ev in handle` (asyncio).

    engine = Engine(model, max_batch=32)
    for ev in engine.submit(Job([50256], SamplingParams(max_tokens=20, temperature=0))):
        ...
    engine.close()
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from nanogpt.data.tokenizer import EOT_ID
from nanogpt.infer.sampling import SamplingParams, make_generator, sample_rows
from nanogpt.kernels.decode import Decoder
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache, SlotKVCache

SCORE_TOKENS = 2048  # prompt tokens per scoring forward (its logits take SCORE_TOKENS * vocab floats)


PHASES = ("idle", "score", "prefill", "attention", "decode", "sampling")


@dataclass
class EngineStats:
    """Counters since the engine started: the scheduler's seconds by phase, and what its forwards held.

    Phases: "idle" (waiting for work), "score", "prefill" and "attention" (reading prompts), "decode" (the
    one-token forward of every stream) and "sampling" (choosing, scoring and sending the new tokens, after a
    prefill or a decode forward). A decode step's attention reads every row up to the longest row's length
    (one dense forward), so `keys_read` (rows x the longest row's keys, summed over steps) over
    `keys_needed` (each row's own keys) is what the batch's mixed lengths cost it.
    """

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    decode_steps: int = 0
    decode_rows: int = 0  # summed over decode steps: / decode_steps is the mean batch
    keys_read: int = 0
    keys_needed: int = 0
    prefill_tokens: int = 0  # prompt tokens read, padding not counted


class QueueFull(Exception):
    """The engine's queue is full: answered 429 with Retry-After."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new work: answered 503."""


@dataclass(frozen=True)
class Job:
    """One sequence to generate: a prompt (token ids), how to sample, and what to report."""

    prompt: list[int]
    params: SamplingParams
    logprobs: int | None = None  # alternatives per new token (0: the chosen token's log-prob only)
    score_prompt: bool = False  # report the prompt's log-probs first (`PromptScores`)
    prompt_top: int = 0  # alternatives per prompt token when scoring
    deadline: float | None = None  # time.monotonic() past which the job is cancelled ("timeout")
    attention: bool = False  # report the prompt's attention weights (`AttentionMaps`) instead of generating


@dataclass(frozen=True)
class Token:
    id: int
    logprob: float | None = None  # log-softmax of the raw logits (before temperature and filters)
    top: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class PromptScores:
    logprobs: list[float | None]  # per prompt token; the first has none
    top: list[list[tuple[int, float]] | None]


@dataclass(frozen=True)
class AttentionMaps:
    """An attention job's answer: the eager attention weights of its prompt."""

    weights: torch.Tensor  # (n_layers, n_heads, T, T) fp32 on the CPU; row i sums to 1 over keys 0..i


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled" | "timeout" | "error"
    message: str = ""


Event = Token | PromptScores | AttentionMaps | Finished


class Handle:
    """A submitted job's events, in order; `cancel()` takes it out of the batch before the next step."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop | None) -> None:
        self.job, self._loop = job, loop
        self._sync: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, ev: Event) -> None:
        if self._async is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self.cancelled = True
        else:
            self._sync.put(ev)

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self._sync.get()
            yield ev
            if isinstance(ev, Finished):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        assert self._async is not None, "submit(..., loop=...) to read a handle with async for"
        while True:
            ev = await self._async.get()
            yield ev
            if isinstance(ev, Finished):
                return


@dataclass
class _Seq:
    """A job in the batch: where its prompt reading is, what it generated, its sampling state."""

    handle: Handle
    generator: torch.Generator | None
    limit: int  # new tokens allowed: max_tokens, bounded by the context
    fed: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # (1, V) token counts for the penalties

    @property
    def job(self) -> Job:
        return self.handle.job


@dataclass
class _Attending:
    """An attention job being read: its own KV cache (not a batch slot) and the weight rows so far."""

    handle: Handle
    cache: KVCache
    weights: torch.Tensor  # (L, nh, T, T) fp32, filled `prefill_chunk` rows at a time
    fed: int = 0

    @property
    def job(self) -> Job:
        return self.handle.job


class Engine:
    """One model, one scheduler thread, a bounded queue; see the module docstring."""

    def __init__(
        self,
        model: NanoGPTLMHeadModel,
        name: str = "nanogpt",
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_chunk: int = 64,
        dtype: str = "fp32",
        on_event: Callable[[str, float], None] | None = None,
        thread: bool = True,
    ) -> None:
        self.model, self.name, self.dtype = model.eval(), name, dtype
        self.cfg = model.config
        self.context_length = model.config.context_length
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.decoder = Decoder(model, dtype)  # the fast decode path: copies, precision, kernels
        self.device = self.decoder.device
        self.on_event = on_event or (lambda kind, value: None)
        self.waiting: deque[Handle] = deque()
        self.scoring: list[_Seq] = []
        self.decoding: list[_Seq] = []  # slot i holds decoding[i]
        self.reading: list[_Seq] = []  # slot len(decoding) + j holds reading[j]
        self.attending: list[_Attending] = []  # attention jobs, first come first served
        self._attention_turn = False  # this step's prompt budget goes to an attention job (they alternate)
        self._cond = threading.Condition()
        self._closing = False
        self._drain_until: float | None = None
        self.cancelled_at_close = 0
        self._done = threading.Event()
        self.stats = EngineStats()  # written by the scheduler only; read through `stats_now`
        self._idle_since: float | None = None  # when the scheduler's wait for work began, while it waits
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="nanogpt-engine", daemon=True)
            self._thread.start()

    # --- the API ---------------------------------------------------------------------------------------

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue `job`; its events arrive on the returned handle (async ones on `loop`'s thread)."""
        return self.submit_all([job], loop)[0]

    def submit_all(self, jobs: list[Job], loop: asyncio.AbstractEventLoop | None = None) -> list[Handle]:
        """Queue every job of `jobs` or none of them (`QueueFull` when they do not all fit in the queue).

        All or none: a request's choices never hold queue places they give back a moment later, so more
        choices than `max_queue` never fit, and fewer always do once the queue has room for them.
        """
        for job in jobs:
            scored_only = job.params.max_tokens == 0 and not job.attention  # its last token is never fed
            if len(job.prompt) > self.context_length + scored_only:
                raise ValueError(
                    f"prompt is {len(job.prompt)} tokens, the model's context is {self.context_length}"
                )
        handles = [Handle(job, loop) for job in jobs]
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self.waiting) + len(handles) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.extend(handles)
            self._cond.notify()
        return handles

    def stats_now(self) -> EngineStats:
        """A copy of `stats` with a wait for work still going counted up to now (what /metrics reports: a
        scrape of an idle server sees its idle time grow)."""
        with self._cond:  # the scheduler ends a wait under this lock: never counted twice or not at all
            st = replace(self.stats, seconds=dict(self.stats.seconds))
            if self._idle_since is not None:
                st.seconds["idle"] += time.perf_counter() - self._idle_since
        return st

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.scoring) + len(self.decoding) + len(self.reading) + len(self.attending)

    def close(self, drain_seconds: float = 0.0, wait: bool = True) -> None:
        """Take no new jobs; let active and queued ones run for up to `drain_seconds`, cancel the rest.

        With `wait`, return once the scheduler stopped (not from the thread that runs it: a signal
        handler of the thread inside `run` passes wait=False). A second call may shorten the drain.
        """
        with self._cond:
            until = time.monotonic() + drain_seconds
            if not self._closing or until < (self._drain_until or until):
                self._drain_until = until
            self._closing = True
            self._cond.notify()
        if wait:
            self._done.wait()

    # --- the scheduler -----------------------------------------------------------------------------------

    def run(self) -> None:
        """The scheduler; until `close`. Its own thread by default (`thread=True`); `nanogpt serve` runs it
        in the main thread instead, so that every torch call of the process comes from one thread: with
        GNU OpenMP, a second thread's parallel regions ran at half speed once the first had run its own."""
        try:
            self._schedule()
        finally:
            self._done.set()

    def _schedule(self) -> None:
        # made here, in the thread that computes (see `run`)
        self.cache = SlotKVCache.for_model(self.cfg, self.max_batch, self.device, self.decoder.cache_dtype)
        self.decoder.prepare()  # the first request does not wait for the decode copies
        while True:
            with self._cond:
                self._idle_since = time.perf_counter()
                while not (self.waiting or self.active or self._closing):
                    self._cond.wait()
                self.stats.seconds["idle"] += time.perf_counter() - self._idle_since
                self._idle_since = None
                if self._closing and (
                    not (self.waiting or self.active) or time.monotonic() >= (self._drain_until or 0)
                ):
                    break
                self._admit()
            try:
                self._drop_cancelled()
                with torch.inference_mode():
                    self._timed("score", self._score)
                    self._read_prompts()
                    self._timed("decode", self._decode)
            except Exception as e:  # never a dead scheduler: fail what was running, go on
                for h in self._running():
                    h._put(Finished("error", f"{type(e).__name__}: {e}"))
                self.scoring, self.decoding, self.reading, self.attending = [], [], [], []
        left = list(self.waiting) + self._running()
        for h in left:
            h._put(Finished("cancelled", "the server shut down"))
        self.cancelled_at_close = len(left)
        self.waiting.clear()
        self.scoring, self.decoding, self.reading, self.attending = [], [], [], []

    def _timed(self, phase: str, forward: Callable[[], None]) -> None:
        """Run one phase, its seconds counted in `stats` (less the sampling it did, counted on its own)."""
        seconds = self.stats.seconds
        t0, sampled = time.perf_counter(), seconds["sampling"]
        forward()
        seconds[phase] += time.perf_counter() - t0 - (seconds["sampling"] - sampled)

    def _running(self) -> list[Handle]:
        return [s.handle for s in self.scoring + self.decoding + self.reading] + [
            a.handle for a in self.attending
        ]

    def _admit(self) -> None:
        """Move waiting jobs into the batch while it has room (called with the lock held)."""
        while self.waiting and self.active < self.max_batch:
            h = self.waiting.popleft()
            job = h.job
            if job.attention:
                self._start_attending(h)
                continue
            # the last new token is never fed back: a prompt of P tokens has room for context_length - P + 1 more
            limit = min(job.params.max_tokens, self.context_length - len(job.prompt) + 1)
            gen = None if job.params.greedy else make_generator(job.params.seed, self.device)
            counts = torch.zeros(1, self.cfg.vocab_size, device=self.device) if job.params.penalised else None
            seq = _Seq(h, gen, max(0, limit), counts=counts)
            if job.score_prompt:
                self.scoring.append(seq)
            elif seq.limit == 0:
                h._put(Finished("length"))
            else:
                self._start_reading(seq)

    def _start_attending(self, h: Handle) -> None:
        L, nh, T = self.cfg.n_layers, self.cfg.n_heads, len(h.job.prompt)
        cache = KVCache.for_model(self.cfg, 1, self.device, self.decoder.cache_dtype, max_len=T)
        self.attending.append(_Attending(h, cache, torch.zeros(L, nh, T, T)))

    def _start_reading(self, seq: _Seq) -> None:
        self.cache.lengths[len(self.decoding) + len(self.reading)] = 0
        self.reading.append(seq)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()

        def gone(s: _Seq | _Attending) -> str | None:
            if s.handle.cancelled:
                return "cancelled"
            if s.job.deadline is not None and now >= s.job.deadline:
                return "timeout"
            return None

        for s in list(self.scoring):
            if reason := gone(s):
                self.scoring.remove(s)
                s.handle._put(Finished(reason))
        for a in list(self.attending):
            if reason := gone(a):
                self.attending.remove(a)
                a.handle._put(Finished(reason))
        for group in (self.decoding, self.reading):
            for s in [s for s in group if gone(s)]:
                reason = gone(s) or "cancelled"
                self._remove(s)
                s.handle._put(Finished(reason))
        with self._cond:
            for h in list(self.waiting):
                late = h.job.deadline is not None and now >= h.job.deadline
                if h.cancelled or late:
                    self.waiting.remove(h)
                    h._put(Finished("timeout" if late and not h.cancelled else "cancelled"))

    def _remove(self, seq: _Seq) -> None:
        """Take a sequence out of the cache slots, keeping the active ones consecutive."""
        d = len(self.decoding)
        if seq in self.decoding:
            i = self.decoding.index(seq)
            last = self.decoding.pop()
            if last is not seq:  # the last stream takes the freed slot
                self.cache.move(d - 1, i)
                self.decoding[i] = last
            if self.reading:  # the last prompt being read fills the stream's old last slot
                self.cache.move(d - 1 + len(self.reading), d - 1)
                self.reading.insert(0, self.reading.pop())
        else:
            j = self.reading.index(seq)
            last = self.reading.pop()
            if last is not seq:
                self.cache.move(d + len(self.reading), d + j)
                self.reading[j] = last

    # --- the three kinds of forward ------------------------------------------------------------------------

    def _score(self) -> None:
        """Log-probs of the scoring jobs' prompts, in one right-padded full forward."""
        if not self.scoring:
            return
        n, tokens = 0, 0  # a bounded forward: the (B, T, V) logits of long prompts are large
        while n < len(self.scoring) and (n == 0 or tokens + len(self.scoring[n].job.prompt) <= SCORE_TOKENS):
            tokens += len(self.scoring[n].job.prompt)
            n += 1
        batch, self.scoring = self.scoring[:n], self.scoring[n:]
        T = max(len(s.job.prompt) for s in batch)
        idx = torch.full((len(batch), max(T - 1, 1)), EOT_ID, dtype=torch.long)
        for b, s in enumerate(batch):
            idx[b, : len(s.job.prompt) - 1] = torch.tensor(s.job.prompt[:-1], dtype=torch.long)
        logits = self.decoder.prefill(idx.to(self.device), None, last_only=False)
        for b, s in enumerate(batch):
            ids = s.job.prompt
            logp = F.log_softmax(logits[b, : len(ids) - 1].float(), dim=-1)  # row i: token i + 1
            chosen = logp.gather(1, torch.tensor(ids[1:], device=logp.device)[:, None])[:, 0].tolist()
            top: list[list[tuple[int, float]] | None] = [None]
            if s.job.prompt_top:
                vals, alt = torch.topk(logp, s.job.prompt_top, dim=-1)
                top += [
                    list(zip(a, v, strict=True)) for a, v in zip(alt.tolist(), vals.tolist(), strict=True)
                ]
            else:
                top += [[] for _ in ids[1:]]
            s.handle._put(PromptScores([None, *chosen], top))
            if s.limit == 0:
                s.handle._put(Finished("length"))
            else:
                self._start_reading(s)

    def _read_prompts(self) -> None:
        """This step's prompt reading, `prefill_chunk` tokens at most: a chunk of the prompts being read
        (`_prefill`) or of the first attention job (`_attend`). While both wait they take turns, so each
        step adds one prefill chunk's time at most before the decode step, and neither waits forever."""
        attend = bool(self.attending) and (not self.reading or self._attention_turn)
        if attend:
            self._timed("attention", self._attend)
        else:
            self._timed("prefill", self._prefill)
        self._attention_turn = not attend

    def _attend(self) -> None:
        """The next `prefill_chunk` tokens of the first attention job, through the eager attention path.

        Chunk by chunk over the job's own KV cache: rows fed .. fed + c of every layer's (T, T) weights,
        each row over the keys up to its own position (the causal rule; the rest stays 0).
        """
        a = self.attending[0]
        lo = a.fed
        chunk = a.job.prompt[lo : lo + self.prefill_chunk]
        hi = lo + len(chunk)
        maps: list[torch.Tensor] = []
        self.decoder.prefill(torch.tensor([chunk], device=self.device), a.cache, attention=maps)
        for layer, w in enumerate(maps):  # w (1, nh, c, hi): these queries against every key so far
            a.weights[layer, :, lo:hi, :hi] = w[0].float().cpu()
        a.fed = hi
        if a.fed == len(a.job.prompt):
            self.attending.pop(0)
            a.handle._put(AttentionMaps(a.weights))
            a.handle._put(Finished("stop"))

    def _prefill(self) -> None:
        """The next `prefill_chunk` prompt tokens, first come first served, left-padded into one forward.

        A budget per step, not per prompt: a step that reads prompts stays about as long as a decode
        step of a few more streams, so a long prompt never stalls the streams (it takes a few steps).
        """
        if not self.reading:
            return
        start, budget, chunks = len(self.decoding), self.prefill_chunk, []
        for s in self.reading:  # in slot order: the rows of one step must be consecutive slots
            if budget == 0:
                break
            chunks.append(s.job.prompt[s.fed : s.fed + budget])
            budget -= len(chunks[-1])
        T = max(map(len, chunks))
        idx = torch.full((len(chunks), T), EOT_ID, dtype=torch.long)
        for b, c in enumerate(chunks):
            idx[b, T - len(c) :] = torch.tensor(c, dtype=torch.long)
        step = self.cache.rows(start, [len(c) for c in chunks])
        self.stats.prefill_tokens += sum(map(len, chunks))
        logits = self.decoder.prefill(idx.to(self.device), step)[:, 0].float()  # (B, V)
        done, rows = [], []
        for b, (s, c) in enumerate(zip(self.reading, chunks, strict=False)):
            s.fed += len(c)
            if s.fed == len(s.job.prompt):
                done.append(s)
                rows.append(b)
        for s in done:  # read in full: it becomes a stream, in the first slot after the streams
            j, first = self.reading.index(s), len(self.decoding)  # reading[j] is in slot first + j
            self.cache.swap(first + j, first)
            self.reading[j], self.reading[0] = self.reading[0], self.reading[j]
            self.decoding.append(self.reading.pop(0))
        if done:
            self._emit(done, logits[rows])

    def _decode(self) -> None:
        """One new token for every stream: each has exactly one drawn token not yet in the cache."""
        if not self.decoding:
            return
        n = len(self.decoding)
        idx = torch.tensor([[s.generated[-1]] for s in self.decoding], device=self.device)  # slot order
        step = self.cache.rows(0, [1] * n)
        st = self.stats
        st.decode_steps, st.decode_rows = st.decode_steps + 1, st.decode_rows + n
        st.keys_read += n * step.keys
        st.keys_needed += sum(self.cache.lengths[:n]) + n
        logits = self.decoder.step(idx, step)[:, 0].float()  # (B, V)
        self._emit(list(self.decoding), logits)

    def _logprobs(
        self, seqs: list[_Seq], logits: torch.Tensor, tokens: list[int]
    ) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """Row b -> (log-prob of its token, its top alternatives), for the rows whose job asked.

        From the raw logits: log p = logit - logsumexp(row), so no (B, V) log-softmax is written.
        """
        want = [b for b, s in enumerate(seqs) if s.job.logprobs is not None]
        if not want:
            return {}
        rows = logits[want]  # (W, V)
        lse = torch.logsumexp(rows, dim=-1)  # (W,)
        chosen = (
            rows.gather(1, torch.tensor([[tokens[b]] for b in want], device=rows.device))[:, 0] - lse
        ).tolist()
        k = max(seqs[b].job.logprobs or 0 for b in want)
        top, alt = torch.topk(rows, k, dim=-1) if k else (rows[:, :0], rows[:, :0].long())
        top_logprobs: list[list[float]] = (top - lse[:, None]).tolist()
        top_ids: list[list[int]] = alt.tolist()
        out = {}
        for i, b in enumerate(want):
            n = seqs[b].job.logprobs or 0
            out[b] = (chosen[i], list(zip(top_ids[i][:n], top_logprobs[i][:n], strict=True)))
        return out

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Draw the next token of each of `seqs` from its row of `logits` (B, V), send it, retire finished ones."""
        t0 = time.perf_counter()
        tokens = sample_rows(
            logits, [s.job.params for s in seqs], [s.generator for s in seqs], [s.counts for s in seqs]
        )
        logprobs = self._logprobs(seqs, logits, tokens)
        now = time.monotonic()
        for b, (s, t) in enumerate(zip(seqs, tokens, strict=True)):
            lp, top = logprobs.get(b, (None, None))
            if s.handle.first_token_at is None:
                s.handle.first_token_at = now
                self.on_event("ttft", now - s.handle.submitted)
            if t == EOT_ID:
                self._finish(s, "stop")
                continue
            s.generated.append(t)
            if s.counts is not None:
                s.counts[0, t] += 1
            s.handle._put(Token(t, lp, top))
            self.on_event("token", 1.0)
            if len(s.generated) >= s.limit:  # max_tokens, or the context is full (see `_admit`)
                self._finish(s, "length")
        self.stats.seconds["sampling"] += time.perf_counter() - t0

    def _finish(self, seq: _Seq, reason: str) -> None:
        self._remove(seq)
        seq.handle._put(Finished(reason))
        self.on_event("finished", time.monotonic() - seq.handle.submitted)
