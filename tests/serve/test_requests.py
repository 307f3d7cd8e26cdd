"""`nanogpt.serve.requests`: every OpenAI request field read, checked or refused, as pure functions."""

from __future__ import annotations

import math

import pytest

from nanogpt.data.tokenizer import EOT_ID, get_tokenizer
from nanogpt.infer.sampling import MAX_SEED, SamplingParams
from nanogpt.serve.requests import (
    CHAT_FIELDS,
    COMPLETIONS_FIELDS,
    IGNORED_FIELDS,
    MAX_N,
    BadRequest,
    allowed_fields,
    chat_prompt,
    check_context,
    parse_json_body,
    parse_request,
)

TOK = get_tokenizer()
VOCAB = TOK.vocab_size
HI = [{"role": "user", "content": "Hi"}]


def completion(vocab_size: int = VOCAB, **fields):
    return parse_request({"prompt": "Hello", **fields}, TOK, chat=False, vocab_size=vocab_size)


def chat(messages=None, **fields):
    return parse_request({"messages": messages or HI, **fields}, TOK, chat=True, vocab_size=VOCAB)


def refused(parse, param: str | None, says: str = "", **fields) -> BadRequest:
    """`parse(**fields)` raises BadRequest naming `param`; its message says `says`."""
    with pytest.raises(BadRequest) as e:
        parse(**fields)
    assert e.value.param == param, (e.value.param, str(e.value))
    assert says in str(e.value), str(e.value)
    return e.value


# --- defaults ---------------------------------------------------------------------------------------------


def test_openai_defaults_not_the_cli_ones():
    """Every SamplingParams field is set from the request: temperature 1, no top-k, top-p 1, no penalties."""
    r = completion()
    assert r.sampling == SamplingParams(
        max_tokens=16, temperature=1.0, top_k=None, top_p=1.0, seed=None, stop=(), logit_bias=(),
        presence_penalty=0.0, frequency_penalty=0.0,
    )  # fmt: skip
    assert (r.chat, r.prompts, r.n, r.logprobs, r.echo) == (False, [TOK.encode("Hello")], 1, None, False)
    assert (r.stream, r.include_usage, r.token_ids, r.model) == (False, False, False, None)
    c = chat()
    assert c.chat and c.sampling.max_tokens == 256 and c.sampling.temperature == 1.0
    assert c.prompts == [TOK.encode("User:\nHi") + [EOT_ID] + TOK.encode("Assistant:\n")]


def test_null_is_absent():
    nulls = dict.fromkeys(
        ("max_tokens", "temperature", "top_p", "seed", "n", "logprobs", "stop", "logit_bias")
    )
    assert completion(**nulls) == completion()


def test_sampling_fields_are_read():
    r = completion(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=3, stop=["\n", "."],
        presence_penalty=1.5, frequency_penalty=-2, logit_bias={"15496": 5, "0": -100.0},
        model="tiny", return_tokens_as_token_ids=True,
    )  # fmt: skip
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (
        7,
        0.5,
        0.9,
        40,
        3,
        ("\n", "."),
    )
    assert (s.presence_penalty, s.frequency_penalty) == (1.5, -2.0)
    assert s.logit_bias == ((15496, 5.0), (0, -100.0))
    assert r.model == "tiny" and r.token_ids
    assert completion(top_k=-1).sampling.top_k is None and completion(top_k=0).sampling.top_k is None
    assert completion(stop="\n").sampling.stop == ("\n",)


# --- max tokens ------------------------------------------------------------------------------------------------


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=9).sampling.max_tokens == 9
    assert chat(max_completion_tokens=5).sampling.max_tokens == 5
    assert chat(max_tokens=9, max_completion_tokens=5).sampling.max_tokens == 5
    assert chat(max_tokens=9, max_completion_tokens=None).sampling.max_tokens == 9
    # both are checked, even the one that loses
    refused(chat, "max_tokens", "out of range", max_tokens=-1, max_completion_tokens=5)
    refused(chat, "max_completion_tokens", "must be an integer", max_completion_tokens=2.5)
    refused(completion, "max_completion_tokens", "not supported", max_completion_tokens=5)  # chat's field


# --- logit_bias -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bias, says",
    [
        ({"abc": 1}, "not a token id"),
        ({"-1": 1}, "not a token id"),
        ({"1.5": 1}, "not a token id"),
        ({" 5": 1}, "not a token id"),
        ({"9" * 5000: 1}, "not a token id"),  # too long for int(): refused before it is read
        ({str(VOCAB): 1}, f"[0, {VOCAB})"),
        ({"5": 101}, "[-100, 100]"),
        ({"5": -100.5}, "[-100, 100]"),
        ({"5": "1"}, "[-100, 100]"),
        ({"5": True}, "[-100, 100]"),
        ({"5": math.nan}, "[-100, 100]"),
        ({"5": math.inf}, "[-100, 100]"),
        ([[5, 1]], "must be an object"),
        ("5:1", "must be an object"),
    ],
)
def test_logit_bias_refused(bias, says):
    refused(completion, "logit_bias", says, logit_bias=bias)
    refused(chat, "logit_bias", says, logit_bias=bias)


def test_logit_bias_ids_are_bounded_by_the_given_vocab():
    assert completion(vocab_size=100, logit_bias={"99": 1}).sampling.logit_bias == ((99, 1.0),)
    refused(lambda **f: completion(vocab_size=100, **f), "logit_bias", "[0, 100)", logit_bias={"100": 1})
    assert completion(logit_bias={}).sampling.logit_bias == ()


# --- penalties --------------------------------------------------------------------------------------------


def test_penalties_supported_in_range():
    for name in ("presence_penalty", "frequency_penalty"):
        assert getattr(chat(**{name: 2}).sampling, name) == 2.0
        assert getattr(completion(**{name: -2.0}).sampling, name) == -2.0
        refused(completion, name, "out of range", **{name: 2.01})
        refused(chat, name, "must be a finite number", **{name: math.nan})
        refused(chat, name, "must be a finite number", **{name: "1"})
    assert completion(repetition_penalty=1).sampling == completion().sampling
    refused(completion, "repetition_penalty", "not supported", repetition_penalty=1.2)
    refused(chat, "repetition_penalty", "must be a finite number", repetition_penalty=math.inf)


# --- n, best_of, seeds per choice ---------------------------------------------------------------------------


def test_n_choices():
    assert completion(n=MAX_N).n == MAX_N and chat(n=3).n == 3
    for bad, says in (
        (0, "out of range"),
        (MAX_N + 1, "out of range"),
        (1.5, "an integer"),
        (True, "an integer"),
    ):
        refused(completion, "n", says, n=bad)
    assert completion(best_of=1).n == 1
    refused(completion, "best_of", "not supported", best_of=2)
    refused(completion, "best_of", "not supported", best_of=True)
    refused(chat, "best_of", "not supported", best_of=1)  # not a chat field at all


def test_each_choice_gets_its_own_seed():
    r = completion(n=3, seed=5)
    assert [r.sampling_for(i).seed for i in range(3)] == [5, 6, 7]
    assert r.sampling_for(1) == SamplingParams(**{**r.sampling.__dict__, "seed": 6})
    assert completion(n=2, seed=MAX_SEED).sampling_for(1).seed == 0  # wraps within uint64
    assert completion(n=2).sampling_for(1).seed is None


# --- logprobs and echo ------------------------------------------------------------------------------------


def test_completions_logprobs_and_echo():
    assert completion(logprobs=0).logprobs == 0 and completion(logprobs=100).logprobs == 100
    refused(completion, "logprobs", "out of range", logprobs=101)
    refused(completion, "logprobs", "must be an integer", logprobs=True)  # chat's form is not this one's
    assert completion(echo=True).echo
    refused(completion, "echo", "true or false", echo="true")


def test_chat_logprobs_and_top_logprobs():
    assert chat(logprobs=True, top_logprobs=20).logprobs == 20
    assert chat(logprobs=True).logprobs == 0  # the chosen token's logprob, no alternatives
    assert chat(logprobs=False).logprobs is None and chat().logprobs is None
    refused(chat, "top_logprobs", "out of range", logprobs=True, top_logprobs=21)
    refused(chat, "top_logprobs", "needs 'logprobs': true", top_logprobs=2)
    refused(chat, "top_logprobs", "needs 'logprobs': true", logprobs=False, top_logprobs=2)
    refused(chat, "logprobs", "true or false", logprobs=5)
    # chat has no echo: false is harmless, true would change the output
    assert not chat(echo=False).echo
    refused(chat, "echo", "not supported", echo=True)


# --- stream options -----------------------------------------------------------------------------------------


def test_stream_options():
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True, stream_options={}).include_usage
    assert chat(
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False}
    ).include_usage
    refused(
        chat, "stream_options", "only allowed when 'stream' is true", stream_options={"include_usage": True}
    )
    refused(chat, "stream_options", "only allowed", stream=False, stream_options={"include_usage": True})
    refused(chat, "stream_options", "must be an object", stream=True, stream_options=True)
    refused(chat, "stream_options.foo", "not supported", stream=True, stream_options={"foo": 1})
    refused(
        completion,
        "stream_options.include_usage",
        "true or false",
        stream=True,
        stream_options={"include_usage": 1},
    )
    assert completion(stream_options=None).include_usage is False


# --- strict types -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("stream", "false", "true or false"),
        ("stream", 0, "true or false"),
        ("return_tokens_as_token_ids", "yes", "true or false"),
        ("max_tokens", 1.5, "an integer"),
        ("max_tokens", "5", "an integer"),
        ("temperature", math.nan, "a finite number"),
        ("temperature", -math.inf, "a finite number"),
        ("temperature", True, "a finite number"),
        ("seed", 2**64, "out of range"),
        ("seed", -1, "out of range"),
        ("top_k", 2.5, "an integer"),
        ("stop", 3, "'stop' must be"),
        ("stop", ["a", ""], "'stop' must be"),
        ("model", 7, "must be a string"),
        ("model", ["tiny"], "must be a string"),
    ],
)
def test_strict_types(field, value, says):
    refused(completion, field, says, **{field: value})
    refused(chat, field, says, **{field: value})


def test_integers_written_as_floats_and_the_range_ends_are_accepted():
    r = completion(max_tokens=2.0, seed=MAX_SEED, temperature=100, top_p=1e-9, n=1.0)
    assert (r.sampling.max_tokens, r.sampling.seed, r.n) == (2, MAX_SEED, 1)
    assert isinstance(r.sampling.max_tokens, int)


# --- prompts --------------------------------------------------------------------------------------------------


def test_completion_prompt_forms():
    assert completion().prompts == [TOK.encode("Hello")]
    r = parse_request({"prompt": ["a", [5, 6]]}, TOK, chat=False, vocab_size=VOCAB)
    assert r.prompts == [TOK.encode("a"), [5, 6]]
    assert parse_request({"prompt": ""}, TOK, chat=False, vocab_size=VOCAB).prompts == [[EOT_ID]]
    for body in ({}, {"prompt": None}):
        refused(lambda b=body: parse_request(b, TOK, chat=False, vocab_size=VOCAB), "prompt", "required")
    refused(completion, "prompt", "must be a string", prompt=[1, "a"])
    refused(completion, "prompt", f"[0, {VOCAB})", prompt=[VOCAB])


# --- chat messages ------------------------------------------------------------------------------------------


def test_content_parts_are_joined_text():
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    rendered = "System:\nBe brief.<|endoftext|>User:\nHello\nthere<|endoftext|>Assistant:\n"
    assert chat_prompt(messages) == TOK.encode_with_eot(rendered)
    assert chat(messages).prompts == [TOK.encode_with_eot(rendered)]


@pytest.mark.parametrize(
    "part, says",
    [
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "'image_url' part"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "'input_audio' part"),
        ({"type": "file", "file": {"file_id": "f"}}, "'file' part"),
        ("just text", "not a {type, text} object"),
        ({"text": "no type"}, "not a {type, text} object"),
        ({"type": "text", "text": 5}, '{"type": "text", "text": string}'),
        ({"type": "text", "text": "x", "cache_control": {}}, '{"type": "text", "text": string}'),
    ],
)
def test_non_text_part_refused_by_its_place(part, says):
    content = [{"type": "text", "text": "Look:"}, part]
    refused(chat, "messages[1].content[1]", says, messages=[HI[0], {"role": "user", "content": content}])


def test_roles_names_and_message_keys():
    roles = ["system", "developer", "user", "assistant", "tool"]
    messages = [{"role": r, "content": r.upper(), "name": "n"} for r in roles]
    messages[4]["tool_call_id"] = "call_1"
    # the chat template: developer is the system message, tool its own turn; name is not rendered
    headers = ["System", "System", "User", "Assistant", "Tool"]
    rendered = "".join(f"{h}:\n{r.upper()}<|endoftext|>" for h, r in zip(headers, roles, strict=True))
    assert chat_prompt(messages) == TOK.encode_with_eot(rendered + "Assistant:\n")
    # an assistant turn that only called tools has null content
    assert TOK.decode(chat_prompt([*HI, {"role": "assistant", "content": None, "tool_calls": []}])).endswith(
        "Assistant:\n<|endoftext|>Assistant:\n"
    )
    # "<|endoftext|>" typed in a message is text, not the end of a turn
    typed = chat_prompt([{"role": "user", "content": "a<|endoftext|>b"}])
    assert typed.count(EOT_ID) == 1 and "a<|endoftext|>b" in TOK.decode(typed)
    refused(chat, "messages[0].role", "must be one of", messages=[{"role": "function", "content": "x"}])
    refused(chat, "messages[0].role", "must be one of", messages=[{"content": "x"}])
    refused(chat, "messages[0].content", "string or a list", messages=[{"role": "user", "content": None}])
    refused(chat, "messages[0].content", "string or a list", messages=[{"role": "user", "content": 5}])
    refused(
        chat, "messages[0].name", "must be a string", messages=[{"role": "user", "content": "x", "name": 1}]
    )
    refused(
        chat, "messages[0].audio", "not supported", messages=[{"role": "user", "content": "x", "audio": {}}]
    )
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    refused(
        chat,
        "messages[0].tool_calls",
        "not supported",
        messages=[{"role": "assistant", "tool_calls": [call]}],
    )
    for bad in (None, [], "Hi", {"role": "user"}):
        refused(lambda b=bad: parse_request({"messages": b}, TOK, chat=True, vocab_size=VOCAB), "messages")
    refused(chat, "messages[0]", "must be an object", messages=["Hi"])


# --- the allow-lists ------------------------------------------------------------------------------------------


def test_unknown_fields_are_refused_by_name():
    for field in ("min_p", "ignore_eos", "foo", "prompt_logprobs"):
        refused(completion, field, "not supported by this server", **{field: 1})
        refused(chat, field, "not supported by this server", **{field: 1})
    refused(chat, "prompt", "not a field of /v1/chat/completions", prompt="x")
    refused(completion, "messages", "not a field of /v1/completions", messages=HI)
    refused(completion, "top_logprobs", "not supported", top_logprobs=2)


def test_metadata_fields_are_accepted_and_change_nothing():
    meta = {
        "user": "u-1", "safety_identifier": "s", "metadata": {"run": "a"}, "service_tier": "auto",
        "prompt_cache_key": "k", "parallel_tool_calls": False, "store": False,
    }  # fmt: skip
    assert set(meta) - {"store"} == IGNORED_FIELDS
    assert completion(**meta) == completion()
    assert chat(**meta) == chat()
    refused(completion, "user", "must be a string", user=5)
    refused(chat, "metadata", "must be an object", metadata="x")
    refused(chat, "parallel_tool_calls", "true or false", parallel_tool_calls="true")
    refused(chat, "store", "not supported", store=True)


@pytest.mark.parametrize(
    "field, neutral, other",
    [
        ("tools", [], [{"type": "function", "function": {"name": "f"}}]),
        ("functions", [], [{"name": "f"}]),
        ("tool_choice", "none", "required"),
        ("tool_choice", "auto", {"type": "function", "function": {"name": "f"}}),
        ("function_call", "none", {"name": "f"}),
        ("response_format", {"type": "text"}, {"type": "json_object"}),
        ("response_format", {"type": "text"}, {"type": "json_schema", "json_schema": {"name": "x"}}),
        ("modalities", ["text"], ["text", "audio"]),
        ("reasoning_effort", None, "low"),
        ("verbosity", None, "low"),
        ("prediction", None, {"type": "content", "content": "x"}),
        ("audio", None, {"voice": "alloy", "format": "wav"}),
        ("web_search_options", None, {}),
    ],
)
def test_chat_fields_that_would_change_the_output(field, neutral, other):
    assert chat(**{field: neutral}) == chat()
    refused(chat, field, f"'{field}' is not supported by this server", **{field: other})


def test_completion_fields_that_would_change_the_output():
    assert completion(suffix="") == completion() == completion(suffix=None)
    refused(completion, "suffix", "'suffix' is not supported by this server", suffix=" end")


def test_every_allowed_field_checks_its_value():
    """No field on the allow-lists takes any value silently: a nonsense object is refused, by name."""
    nonsense = {"nonsense": [1]}
    for is_chat, fields in ((False, COMPLETIONS_FIELDS), (True, CHAT_FIELDS)):
        base = {"messages": HI} if is_chat else {"prompt": "Hi"}
        for field in sorted(allowed_fields(is_chat) - {"metadata"}):  # metadata is an object of anything
            with pytest.raises(BadRequest) as e:
                parse_request({**base, field: nonsense}, TOK, chat=is_chat, vocab_size=VOCAB)
            assert e.value.param is not None and e.value.param.split("[")[0].split(".")[0] == field, (
                field,
                str(e.value),
            )
        assert fields <= allowed_fields(is_chat)


# --- the body and the context -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, says",
    [
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "\xff"}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "too deep"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "too long"),
    ],
)
def test_json_body_refused(raw, says):
    with pytest.raises(BadRequest, match=says) as e:
        parse_json_body(raw)
    assert e.value.param is None


def test_context_length_exceeded():
    ids = list(range(10))
    check_context(completion(prompt=ids, max_tokens=1), 10)
    e = refused(
        lambda **f: check_context(completion(**f), 9), "prompt", "the model's context is 9", prompt=ids
    )
    assert e.code == "context_length_exceeded"
    check_context(completion(prompt=ids, max_tokens=0, echo=True, logprobs=1), 9)  # scoring takes one more
    refused(lambda **f: check_context(completion(**f), 8), "prompt", "one more", prompt=ids, max_tokens=0)
    long_chat = [{"role": "user", "content": "to be or not " * 10}]
    refused(lambda **f: check_context(chat(**f), 16), "messages", "context", messages=long_chat)


def test_a_request_of_more_choices_than_the_queue_is_refused():
    from nanogpt.serve.requests import check_queue

    check_queue(completion(n=4), 4)  # the whole queue is fine
    refused(lambda **f: check_queue(completion(**f), 3), "n", "'n'=4 exceeds this server's queue of 3", n=4)
    e = refused(
        lambda **f: check_queue(completion(**f), 3),
        "prompt",
        "4 prompts x 'n'=1 = 4 choices",
        prompt=["a", "b"] * 2,
    )
    assert "--max-queue" in str(e)


def test_bearer_scheme_is_case_insensitive_and_the_key_is_not():
    from nanogpt.serve.app import bearer_token

    for header in (b"Bearer k-1", b"bearer k-1", b"BEARER  k-1", b" bEaReR k-1 "):
        assert bearer_token(header) == b"k-1", header
    for header in (b"", b"Basic k-1", b"k-1", b"Bearerk-1"):
        assert bearer_token(header) is None, header


def test_exposure_warning_only_without_a_key_off_loopback():
    from nanogpt.commands.serve import exposure_warning

    assert exposure_warning("0.0.0.0", "0.0.0.0", None).startswith("nanogpt serve: warning: --host 0.0.0.0")
    assert exposure_warning("::", "::", None) is not None
    assert exposure_warning("0.0.0.0", "0.0.0.0", "key") is None
    for host in ("127.0.0.1", "127.0.0.2", "::1"):
        assert exposure_warning("localhost", host, None) is None
