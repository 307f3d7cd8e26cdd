"""The chat template in the Hugging Face export: `tokenizer_config.json` carries `data.chat.JINJA`, and
transformers' `apply_chat_template` renders our string and gives exactly our ids on every conversation of
the test data (real transformers on a real export, both formats).

The export's tokenizer reads a typed `<|endoftext|>` as text (`split_special_tokens`, docs/data.md), which
would also split the one the template writes; chat ids are therefore asked for with
`tokenizer_kwargs={"split_special_tokens": False}` (or a tokenizer loaded with `split_special_tokens=False`).
"""

from __future__ import annotations

import json

import pytest

from nanogpt.data.chat import JINJA, encode_chat, prompt_ids, render
from tests.data.test_chat import ALL

transformers = pytest.importorskip("transformers")
CHAT_IDS = {"tokenizer_kwargs": {"split_special_tokens": False}}


def _ids(out) -> list[int]:
    return out if isinstance(out, list) else list(out["input_ids"])


@pytest.mark.parametrize("fmt", ["gpt2", "remote-code"])
def test_apply_chat_template_gives_our_ids(tiny_exports, fmt):
    folder = tiny_exports[fmt]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == JINJA
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    chat_tok = transformers.AutoTokenizer.from_pretrained(folder, split_special_tokens=False)
    for messages in ALL:
        assert tok.apply_chat_template(messages, tokenize=False) == render(messages)
        assert _ids(tok.apply_chat_template(messages, **CHAT_IDS)) == encode_chat(messages).ids
        asked = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, **CHAT_IDS)
        assert _ids(asked) == prompt_ids(messages[:-1])
        assert _ids(chat_tok.apply_chat_template(messages)) == encode_chat(messages).ids


@pytest.mark.parametrize("fmt", ["gpt2", "remote-code"])
def test_model_card_chat_call_gives_our_prompt(tiny_exports, fmt):
    """The call the exported README shows for chat, run as written, gives our generation prompt."""
    from nanogpt.export.model_card import CHAT_CALL

    folder = tiny_exports[fmt]
    assert CHAT_CALL in (folder / "README.md").read_text()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in ALL:
        out = eval(CHAT_CALL, {"tokenizer": tokenizer, "messages": messages[:-1]})  # noqa: S307 (our constant)
        assert out["input_ids"][0].tolist() == prompt_ids(messages[:-1])
