"""The serving engine on its own (no HTTP): batched streams equal single ones, cancellation, limits."""

import random
import threading
import time

import pytest
import torch

from nanogpt.infer.generate import decode_steps, generate
from nanogpt.infer.sampling import SamplingParams
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.serve.engine import Engine, EngineClosed, Finished, Job, PromptScores, QueueFull, Token
from tests.tiny import tiny_config

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model() -> NanoGPTLMHeadModel:
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def long_model() -> NanoGPTLMHeadModel:
    """A context of 4096: room for streams that outlast a cancel or a deadline."""
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(tiny_config(context_length=4096)).eval()


def prompt(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(1000, 40000), k=n)


def tokens(events) -> list[int]:
    return [e.id for e in events if isinstance(e, Token)]


def test_streams_that_join_a_running_batch_equal_their_single_runs(model):
    # 6 prompts of different lengths (one longer than a prefill chunk), joining at different steps
    prompts = [prompt(n, i) for i, n in enumerate((3, 17, 1, 40, 9, 25))]
    engine = Engine(model, max_batch=4, prefill_chunk=8)  # fewer slots than jobs: some wait their turn
    try:
        handles = []
        for i, p in enumerate(prompts):
            handles.append(engine.submit(Job(p, GREEDY, logprobs=3)))
            time.sleep(0.02 * i)
        for p, h in zip(prompts, handles, strict=True):
            events = list(h)
            got = [e for e in events if isinstance(e, Token)]
            ref = list(decode_steps(model, p, GREEDY))
            assert [e.id for e in got] == [t for t, _ in ref]
            for e, (t, logits) in zip(got, ref, strict=True):
                logp = torch.log_softmax(logits, -1)
                assert abs(e.logprob - float(logp[t])) < 1e-4
                assert [a for a, _ in e.top] == torch.topk(logp, 3).indices.tolist()
            assert events[-1] == Finished("length")
        assert engine.active == 0 and engine.queued == 0
    finally:
        engine.close()


def test_a_seeded_stream_draws_the_same_tokens_alone_or_in_a_crowd(model):
    mine = SamplingParams(max_tokens=15, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    p = prompt(6, 99)
    alone = list(generate(model, p, mine, stop_at_eot=False))
    engine = Engine(model, max_batch=8)
    try:
        crowd = [
            engine.submit(Job(prompt(5 + i, i), SamplingParams(max_tokens=15, temperature=0.7, seed=i)))
            for i in range(5)
        ]
        h = engine.submit(Job(p, mine))
        assert tokens(h) == alone
        for c in crowd:
            list(c)
    finally:
        engine.close()


def test_penalties_and_logit_bias_match_the_library(model):
    p = prompt(5, 3)
    biased = SamplingParams(max_tokens=6, temperature=0, logit_bias=((1234, 100.0),))
    penalised = SamplingParams(
        max_tokens=10, temperature=0.9, seed=1, frequency_penalty=2.0, presence_penalty=1.5
    )
    engine = Engine(model)
    try:
        assert tokens(engine.submit(Job(p, biased))) == [1234] * 6
        assert tokens(engine.submit(Job(p, penalised))) == list(
            generate(model, p, penalised, stop_at_eot=False)
        )
    finally:
        engine.close()


def test_scoring_jobs_give_the_prompt_log_probs(model):
    ids = [prompt(n, n) for n in (2, 30, 65)]  # 65 = the context + 1: what a scoring request may send
    engine = Engine(model)
    try:
        handles = [
            engine.submit(Job(x, SamplingParams(max_tokens=0), score_prompt=True, prompt_top=4)) for x in ids
        ]
        for x, h in zip(ids, handles, strict=True):
            scores, done = list(h)
            assert isinstance(scores, PromptScores) and done == Finished("length")
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([x[:-1]]))[0], -1)
            want = ref.gather(1, torch.tensor(x[1:])[:, None])[:, 0]
            assert scores.logprobs[0] is None
            torch.testing.assert_close(torch.tensor(scores.logprobs[1:]), want, atol=1e-4, rtol=0)
            assert [a for a, _ in scores.top[-1]] == torch.topk(ref[-1], 4).indices.tolist()
    finally:
        engine.close()


def test_generation_ends_at_the_context(model):
    ctx = model.config.context_length
    engine = Engine(model)
    try:
        events = list(engine.submit(Job(prompt(ctx - 2, 1), SamplingParams(max_tokens=100, temperature=0))))
        assert len(tokens(events)) == 3 and events[-1] == Finished("length")  # ctx - 2 + 3 - 1 = ctx fed
        with pytest.raises(ValueError, match="context"):
            engine.submit(Job(prompt(ctx + 1, 1), GREEDY))
    finally:
        engine.close()


def test_a_cancelled_stream_leaves_within_a_step_and_the_next_is_served(long_model):
    model = long_model
    engine = Engine(model, max_batch=1)
    try:
        long = engine.submit(Job(prompt(4, 1), SamplingParams(max_tokens=10_000, temperature=0)))
        events = iter(long)
        next(events)  # it is generating
        waiting = engine.submit(Job(prompt(4, 2), GREEDY))  # no free slot until the first leaves
        long.cancel()
        rest = list(events)
        assert rest[-1] == Finished("cancelled") and len(rest) < 5  # a step or two of tokens already sent
        assert tokens(waiting) == list(generate(model, prompt(4, 2), GREEDY, stop_at_eot=False))
        assert engine.active == 0
    finally:
        engine.close()


def test_deadline_queue_bound_and_close(long_model):
    model = long_model
    engine = Engine(model, max_batch=1, max_queue=2)
    try:
        late = engine.submit(
            Job(
                prompt(4, 1),
                SamplingParams(max_tokens=10_000, temperature=0),
                deadline=time.monotonic() + 0.3,
            )
        )
        late_events = iter(late)
        next(late_events)  # running: it holds the one slot, so the next two wait in the queue
        queued = [engine.submit(Job(prompt(4, i), GREEDY)) for i in range(2)]
        with pytest.raises(QueueFull, match="--max-queue 2"):
            engine.submit(Job(prompt(4, 9), GREEDY))
        assert list(late_events)[-1] == Finished("timeout")
        for h in queued:
            assert list(h)[-1] == Finished("length")
        endless = engine.submit(Job(prompt(4, 3), SamplingParams(max_tokens=10_000, temperature=0)))
        started = time.monotonic()
        engine.close(drain_seconds=0.2)
        assert list(endless)[-1] == Finished("cancelled", "the server shut down")
        assert time.monotonic() - started < 5
        with pytest.raises(EngineClosed):
            engine.submit(Job(prompt(4, 1), GREEDY))
    finally:
        engine.close()


def test_many_clients_with_random_cancels_leave_nothing_active(model):
    engine = Engine(model, max_batch=8, max_queue=64)
    rng = random.Random(0)
    finished: list[str] = []

    def client(i: int) -> None:
        h = engine.submit(
            Job(
                prompt(rng.randint(1, 30), i),
                SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.8, seed=i),
            )
        )
        quit_after = rng.randint(0, 10)
        for n, ev in enumerate(h):
            if n == quit_after:
                h.cancel()
            if isinstance(ev, Finished):
                finished.append(ev.reason)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(finished) == 40 and set(finished) <= {"length", "stop", "cancelled"}
        assert "cancelled" in finished
        assert engine.active == 0 and engine.queued == 0
    finally:
        engine.close()


def test_stats_count_the_scheduler_phases_and_the_decode_rows_and_keys(model):
    # three prompts queued before the scheduler starts: one prefill forward reads all 24 tokens (and draws
    # each first token), then 5 decode steps of the 3 streams; a step's rows hold 5, 8 and 11 prompt tokens
    # plus the tokens made so far, and every row reads up to the longest row (11 + step + 1 keys)
    engine = Engine(model, max_batch=4, thread=False)
    handles = [
        engine.submit(Job(prompt(n, n), SamplingParams(max_tokens=6, temperature=0))) for n in (5, 8, 11)
    ]
    runner = threading.Thread(target=engine.run)
    runner.start()
    try:
        for h in handles:
            assert list(h)[-1] == Finished("length")
    finally:
        engine.close()
        runner.join(timeout=60)
    st = engine.stats
    assert st.prefill_tokens == 24
    assert (st.decode_steps, st.decode_rows) == (5, 15)
    assert st.keys_needed == sum(5 + 8 + 11 + 3 * (i + 1) for i in range(5))  # each row: its length + 1
    assert st.keys_read == sum(3 * (11 + i + 1) for i in range(5))
    assert set(st.seconds) == {"idle", "score", "prefill", "attention", "decode", "sampling"}
    assert st.seconds["prefill"] > 0 and st.seconds["decode"] > 0 and st.seconds["sampling"] > 0
    assert st.seconds["score"] < st.seconds["prefill"] and st.seconds["attention"] == 0
