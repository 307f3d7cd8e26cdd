"""The one chat template: how a conversation becomes token ids and a loss mask, defined once.

GPT-2's vocabulary has no chat tokens and we add none (the card's 50,257 ids stay), so a turn is plain
text with `<|endoftext|>` as its end:

    System:\nBe brief.<|endoftext|>User:\nHi<|endoftext|>Assistant:\nHello!<|endoftext|>

A turn is its header ("System:", "User:", "Assistant:", "Tool:") and a newline, its content with the
surrounding whitespace trimmed, then `<|endoftext|>`; a prompt for a reply ends with "Assistant:\n". The
model stops at `<|endoftext|>` as it stops at the end of any document.

Training scores only the assistant's content and its `<|endoftext|>` (`encode_chat(...).mask`). The ids
are built segment by segment (header, content, end), so the mask boundaries are exact; the segments meet
where GPT-2's byte-level BPE never merges across: at `<|endoftext|>` (a special token), and after the
header's newline (GPT-2's pre-tokenizer keeps a newline before a non-space character apart, and trimmed
content starts with one). So the segment-wise ids equal the ids of the whole rendered string, which is what
transformers' `apply_chat_template` (with `JINJA`) tokenizes, and equal the ids of llama.cpp's chat path,
which tokenizes the template's text and each message's content apart (the GGUF's
`tokenizer.chat_template`); tests check both.

    ids, mask = encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nanogpt.data.tokenizer import EOT_TOKEN, get_tokenizer
from nanogpt.errors import UserError

HEADERS = {"system": "System:", "user": "User:", "assistant": "Assistant:", "tool": "Tool:"}
DATA_ROLES = ("system", "user", "assistant")  # what a training record may hold (mlx-lm's chat roles)
REPLY = "assistant"

# The same template in Jinja, for transformers' tokenizer_config.json and the GGUF's tokenizer.chat_template.
# Only plain if/for/filters, which transformers' Jinja2 and llama.cpp's / node-llama-cpp's engines share.
JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System:\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant:\\n' }}"
    "{% elif message['role'] == 'tool' %}{{ 'Tool:\\n' }}"
    "{% endif %}"
    "{{ message['content'] | trim }}{{ '<|endoftext|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    """A conversation's token ids and, per id, whether training scores it as a target (1) or not (0)."""

    ids: list[int]
    mask: list[int]


def header(role: str) -> str:
    """A turn's opening: "User:\\n"."""
    return HEADERS[role] + "\n"


def turn_text(role: str, content: str) -> str:
    """One turn as text, `<|endoftext|>` excluded: "User:\\nHi"."""
    return header(role) + content.strip()


def render(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as one string, `<|endoftext|>` written out (what `JINJA` renders)."""
    text = "".join(turn_text(m["role"], m["content"]) + EOT_TOKEN for m in messages)
    return text + (header(REPLY) if add_generation_prompt else "")


def encode_chat(
    messages: Sequence[dict[str, str]], *, train_on_prompt: bool = False, add_generation_prompt: bool = False
) -> Encoded:
    """Ids and loss mask of checked `messages` (roles of `HEADERS`, string contents), segment by segment.

    The mask is 1 on each assistant reply's content and its `<|endoftext|>`, 0 elsewhere (headers,
    other turns); `train_on_prompt` makes it 1 everywhere.
    """
    tok = get_tokenizer()
    ids: list[int] = []
    mask: list[int] = []

    def add(piece: list[int], trained: bool) -> None:
        ids.extend(piece)
        mask.extend([int(trained or train_on_prompt)] * len(piece))

    for m in messages:
        if m["role"] == REPLY:
            add(tok.encode(header(REPLY)), False)
            add(tok.encode(m["content"].strip()), True)
            add([tok.eot_id], True)
        else:
            add(tok.encode(turn_text(m["role"], m["content"])), False)
            add([tok.eot_id], False)
    if add_generation_prompt:
        add(tok.encode(header(REPLY)), False)
    return Encoded(ids, mask)


def prompt_ids(messages: Sequence[dict[str, str]]) -> list[int]:
    """The ids that ask for the next assistant reply: the conversation, then "Assistant:\\n"."""
    return encode_chat(messages, add_generation_prompt=True).ids


# ---- training records (JSONL lines in mlx-lm's formats) ----------------------------------------------


def record_kind(row: Any) -> str:
    """A JSONL record's data format: "chat" ({"messages"}), "completions" ({"prompt", "completion"}),
    or "text" (anything else: read as text, as plain corpora are)."""
    if isinstance(row, dict) and "messages" in row:
        return "chat"
    if isinstance(row, dict) and ("prompt" in row or "completion" in row):
        return "completions"
    return "text"


def record_messages(row: Any, kind: str, where: str) -> list[dict[str, str]]:
    """The checked conversation of one chat or completions record; a malformed one raises a one-line
    UserError starting with `where` (file:line)."""
    if kind == "completions":
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                got = "missing" if key not in row else f"{type(row[key]).__name__}, not text"
                raise UserError(
                    f'{where}: {key!r} is {got}; a completions record is {{"prompt": str, "completion": str}}'
                )
        messages = [{"role": "user", "content": row["prompt"]}, {"role": REPLY, "content": row["completion"]}]
    else:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(
                f'{where}: \'messages\' must be a non-empty list of {{"role", "content"}} objects'
            )
    return check_messages(messages, where)


def check_messages(messages: list[Any], where: str) -> list[dict[str, str]]:
    """`messages` as {"role", "content"} dicts of training roles, with at least one assistant turn."""
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise UserError(f'{at} is {type(m).__name__}, not a {{"role", "content"}} object')
        if "role" not in m:
            raise UserError(f"{at} has no 'role'; give each message one of {', '.join(DATA_ROLES)}")
        if m["role"] not in DATA_ROLES:
            raise UserError(f"{at} has role {m['role']!r}; use one of {', '.join(DATA_ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            got = "missing" if "content" not in m else f"{type(content).__name__}, not a string"
            raise UserError(f"{at} ({m['role']}): 'content' is {got}; each message's content must be text")
        if EOT_TOKEN in content:
            raise UserError(
                f"{at} ({m['role']}): the content holds {EOT_TOKEN}, which the chat template uses to end a "
                "turn; remove it from the text"
            )
        out.append({"role": m["role"], "content": content})
    if not any(m["role"] == REPLY for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing would be trained on it")
    return out
