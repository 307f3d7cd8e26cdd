"""The chat template in the GGUF export: `tokenizer.chat_template` holds `data.chat.JINJA`, and llama.cpp's
chat path (node-llama-cpp's chat API, the wrapper it resolves from that key) renders our ids and replies
as our greedy generation does (ecosystem marker; the runner as in test_gguf_llama_cpp.py)."""

from __future__ import annotations

import json
import subprocess

import pytest

gguf = pytest.importorskip("gguf")

from nanogpt import cli  # noqa: E402
from nanogpt.data.chat import JINJA, encode_chat, prompt_ids  # noqa: E402
from nanogpt.data.tokenizer import get_tokenizer  # noqa: E402
from nanogpt.infer.generate import generate  # noqa: E402
from nanogpt.infer.sampling import SamplingParams  # noqa: E402
from tests.data.test_chat import ALL  # noqa: E402
from tests.export.test_gguf_llama_cpp import runner, sharp_model  # noqa: E402, F401 (runner: a fixture)

N = 8  # greedy reply tokens compared
CONTEXT = 64  # the sharp model's


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_chat")
    model = sharp_model(root / "ckpt", activation="gelu_tanh")
    out = root / "chat.gguf"
    assert cli.main(["export", "--model", str(root / "ckpt"), "--out", str(out), "--format", "gguf"]) == 0
    return model, out


def test_gguf_carries_the_chat_template(exported):
    field = gguf.GGUFReader(exported[1]).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == JINJA


@pytest.mark.ecosystem
def test_llama_cpp_chat_uses_our_template(runner, exported, tmp_path):  # noqa: F811
    model, path = exported
    fits = [m for m in ALL if m[-1]["role"] == "assistant" and len(encode_chat(m).ids) + N <= CONTEXT]
    chat_runner = runner.parent / "chat.mjs"
    for i, messages in enumerate(fits[:6]):
        history = tmp_path / f"history{i}.json"
        history.write_text(json.dumps(messages))
        r = subprocess.run(["node", str(chat_runner), str(path), str(history), str(N)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        # node-llama-cpp leaves the history's last reply open (no end token) so the model may continue it
        assert got["wrapper"] == "JinjaTemplate" and got["ids"] == encode_chat(messages).ids[:-1]
        asked = prompt_ids(messages[:-1])
        assert got["prompt_ids"] == asked
        ours = generate(model, asked, SamplingParams(max_tokens=N, temperature=0.0))
        # a chat session trims the reply's leading whitespace (this random model starts with a space)
        assert got["reply"] == get_tokenizer().decode(list(ours)).lstrip()
