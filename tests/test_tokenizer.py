"""Tokenizer: round trips, save/load, special tokens, byte accounting, and the two scripts."""

from __future__ import annotations

import random

import pytest
import torch

from nanochat import tokenizer as tokenizer_module
from nanochat.scripts import tok_eval, tok_train
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

TEST_VOCAB_SIZE = 512  # the vocab size of the shared `tokenizer` fixture (conftest.py)

HAND_PICKED = [
    "",
    "In the beginning God created the heavens and the earth.",
    "line one\nline two\r\n\n\ttabbed   spaced  \n",
    "emoji: 👍🏽 🧑‍🚀 🇫🇷 and a zero width joiner\u200d.",
    "CJK 漢字かなカナ 한국어, Arabic مرحبا, Hindi नमस्ते, combining e\u0301 a\u0308",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "looks special but is plain text: <|bos|><|user_start|>hi<|user_end|>",
    "control chars \x00\x01\x7f and a lone \ufeff BOM",
]


def random_unicode(rng: random.Random, length: int) -> str:
    """Text drawn from all of Unicode except surrogates (which UTF-8 cannot encode)."""
    chars = []
    while len(chars) < length:
        code_point = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x110000)])
        if not 0xD800 <= code_point <= 0xDFFF:
            chars.append(chr(code_point))
    return "".join(chars)


@pytest.fixture(scope="module")
def sample_texts(corpus_docs) -> list[str]:
    rng = random.Random(0)
    return HAND_PICKED + [random_unicode(rng, n) for n in (1, 5, 50, 500)] + corpus_docs[-3:]


def test_trained_vocab_size_is_exact(tokenizer):
    assert tokenizer.vocab_size == TEST_VOCAB_SIZE
    assert tokenizer.token_bytes().shape == (TEST_VOCAB_SIZE,)


def test_encode_decode_round_trips_any_unicode(tokenizer, sample_texts):
    for text in sample_texts:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text


def test_batch_encode_matches_one_by_one(tokenizer, sample_texts):
    batch = tokenizer.encode(sample_texts, prepend="<|bos|>", num_threads=4)
    one_by_one = [tokenizer.encode(text, prepend="<|bos|>") for text in sample_texts]
    assert batch == one_by_one


def test_special_tokens_take_the_last_ids(tokenizer):
    first_special = tokenizer.vocab_size - len(SPECIAL_TOKENS)
    for offset, name in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode_special(name) == first_special + offset
        assert tokenizer.decode([first_special + offset]) == name
    assert tokenizer.bos_token_id == tokenizer.encode_special("<|bos|>")
    # special-token strings inside ordinary text are never turned into special ids
    assert max(tokenizer.encode("<|bos|> <|assistant_end|>")) < first_special
    with pytest.raises(KeyError, match="unknown special token"):
        tokenizer.encode_special("<|nope|>")


def test_prepend_by_name_or_id(tokenizer):
    bos = tokenizer.bos_token_id
    by_name = tokenizer.encode("hello world", prepend="<|bos|>")
    by_id = tokenizer.encode("hello world", prepend=bos)
    assert by_name == by_id == [bos] + tokenizer.encode("hello world")
    end = tokenizer.encode_special("<|assistant_end|>")
    assert tokenizer.encode("hi", append="<|assistant_end|>")[-1] == end


def test_token_bytes_add_up_to_utf8_length(tokenizer, sample_texts):
    token_bytes = tokenizer.token_bytes()
    for text in sample_texts:
        ids = torch.tensor(tokenizer.encode(text, prepend="<|bos|>"), dtype=torch.long)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert (token_bytes[-len(SPECIAL_TOKENS) :] == 0).all()
    assert (token_bytes[: -len(SPECIAL_TOKENS)] >= 1).all()


def test_save_load_gives_the_same_tokenizer(tokenizer, tmp_path, sample_texts):
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.encode(sample_texts) == tokenizer.encode(sample_texts)
    assert torch.equal(torch.load(tmp_path / "token_bytes.pt"), tokenizer.token_bytes())


def test_fingerprint_tells_vocabularies_apart(tokenizer, corpus_docs):
    other = Tokenizer.train(corpus_docs[:50], TEST_VOCAB_SIZE + 8)
    assert other.fingerprint() != tokenizer.fingerprint()
    assert len(tokenizer.fingerprint()) == 16


def test_load_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nanochat.scripts.tok_train") as missing:
        Tokenizer.load(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(missing.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tok_train") as corrupt:
        Tokenizer.load(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(corrupt.value)


def test_training_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["tiny"], 200)
    with pytest.raises(ValueError, match="training text is too small"):
        Tokenizer.train(["ab ab ab"], 1000)


def test_hf_tokenizers_backend_matches_the_contract(corpus_docs, monkeypatch):
    pytest.importorskip("tokenizers")
    monkeypatch.setattr(tokenizer_module, "rustbpe", None)
    trained = Tokenizer.train(corpus_docs[:50], TEST_VOCAB_SIZE)
    assert trained.vocab_size == TEST_VOCAB_SIZE
    for text in HAND_PICKED + corpus_docs[-2:]:
        assert trained.decode(trained.encode(text)) == text


def test_tok_train_and_tok_eval_scripts(data_dir, tmp_path, monkeypatch, capsys):
    tok_train.main(
        ["--vocab-size", "300", "--data-dir", str(data_dir), "--out", str(tmp_path), "--max-chars", "200_000"]
    )
    assert Tokenizer.load(tmp_path).vocab_size == 300
    monkeypatch.setattr(tok_eval, "REFERENCE_ENCODINGS", [])  # keep the test offline and fast
    tok_eval.main(["--data-dir", str(data_dir), "--tokenizer-dir", str(tmp_path)])
    assert "ours" in capsys.readouterr().out
