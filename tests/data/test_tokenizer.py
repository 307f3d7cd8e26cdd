import socket

import pytest

from nanogpt.data.tokenizer import EOT_ID, get_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails, as it would with the network unplugged."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_known_ids_offline(no_network):
    get_tokenizer.cache_clear()
    tok = get_tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_id == EOT_ID == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("The capital of France is") == [464, 3139, 286, 4881, 318]
    assert tok.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize(
    "text",
    [
        "naïve café — 東京 🚀 Ελληνικά עברית",
        "  leading spaces\n\ttabs\r\n",
        "emoji 👩‍👩‍👧 zero\u200bwidth",
        "",
    ],
)
def test_round_trip(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_ordinary():
    tok = get_tokenizer()
    ids = tok.encode("a<|endoftext|>b")
    assert EOT_ID not in ids and tok.decode(ids) == "a<|endoftext|>b"


def test_batch_equals_single():
    tok = get_tokenizer()
    texts = ["First document.", "Second, longer document with more words.", "ü"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# ---- a literal "<|endoftext|>" in text: one behaviour in training and in an HF export --------------------

LITERALS = [
    "a<|endoftext|>b",
    "<|endoftext|>",
    "The end. <|endoftext|> A new story? No: the same document.",
    "twice<|endoftext|><|endoftext|>, café 東京 <|endoftext|>\n",
    "near misses: <|endoftext| <endoftext|> <|ENDOFTEXT|>",
]


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory):
    """The tokenizer files `nanogpt export` writes, built offline from the same GPT-2 BPE files as ours."""
    pytest.importorskip("transformers")
    from nanogpt.export.hf import write_tokenizer

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    write_tokenizer(folder, context_length=64)
    return folder


@pytest.mark.parametrize("text", LITERALS)
def test_hf_export_tokenizer_reads_a_literal_separator_as_text_like_ours(hf_tokenizer_folder, text):
    from transformers import AutoTokenizer, GPT2Tokenizer, GPT2TokenizerFast

    ours = get_tokenizer().encode(text)
    assert EOT_ID not in ours  # typed text never becomes the separator
    if "<|endoftext|>" in text:
        assert len(get_tokenizer().encode("<|endoftext|>")) == 7
    for cls in (AutoTokenizer, GPT2TokenizerFast, GPT2Tokenizer):  # fast (what AutoTokenizer picks) and slow
        tok = cls.from_pretrained(str(hf_tokenizer_folder))
        assert tok(text)["input_ids"] == tok.encode(text) == ours, cls.__name__
        assert tok.decode(ours) == text


def test_hf_export_tokenizer_keeps_the_separator_as_its_eos(hf_tokenizer_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_tokenizer_folder))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.bos_token_id == EOT_ID
    assert tok.convert_tokens_to_ids("<|endoftext|>") == EOT_ID
    ids = get_tokenizer().encode("one<|endoftext|>two") + [EOT_ID]  # a generated separator at the end
    assert tok.decode(ids, skip_special_tokens=True) == "one<|endoftext|>two"  # the typed one is text
    assert tok.decode(ids) == "one<|endoftext|>two<|endoftext|>"
