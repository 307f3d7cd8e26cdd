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
