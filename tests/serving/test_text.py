"""Token ids to streamed text: whole characters only, leading spaces kept, stop strings never leaked."""

from __future__ import annotations

import pytest
from tiny_chat_model import tiny_tokenizer

from ktinject.serving.text import TextStream


def byte_tokenizer():
    """Byte-level BPE without merges: one token per byte, so 'é' takes two tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def metaspace_tokenizer():
    """SentencePiece-style words: a word's leading space is only visible after another word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "▁hello": 1, "▁world": 2, "▁again": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_a_character_split_over_tokens_comes_out_whole():
    tok = byte_tokenizer()
    ids = tok("aé!", add_special_tokens=False)["input_ids"]
    assert len(ids) == 4  # 'é' is two bytes
    stream = TextStream(tok, [])
    assert [stream.push(i) for i in ids] == ["a", "", "é", "!"]


def test_the_first_word_keeps_its_leading_space():
    tok = metaspace_tokenizer()
    assert tok.decode([2]) == "world"  # alone, the space is dropped ...
    stream = TextStream(tok, prompt_ids=[1])
    assert [stream.push(2), stream.push(3)] == [" world", " again"]  # ... but it follows the prompt


def test_long_streams_decode_like_the_whole():
    tok = tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog, again and again.\n" * 3
    ids = tok(text)["input_ids"]
    stream = TextStream(tok, tok("prompt")["input_ids"])
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


@pytest.mark.parametrize("stop, expected", [("fox", "the quick brown "), ("\n", "the quick brown fox"), ("zzz", None)])
def test_stop_strings_cut_the_text_and_are_never_sent(stop, expected):
    tok = tiny_tokenizer()
    text = "the quick brown fox\njumps"
    stream = TextStream(tok, [], stop=[stop, "qx"])  # "qx": 'q' is held back until 'u' shows it is no stop
    deltas = []
    for i in tok(text)["input_ids"]:
        deltas.append(stream.push(i))
        if stream.stopped:
            break
    sent = "".join(deltas)
    if expected is None:
        assert not stream.stopped and sent + stream.flush() == text
        assert deltas[4] == "" and deltas[5] == "qu"  # "the q" -> the 'q' waited for the next character
    else:
        assert stream.stopped and sent == expected
        assert stream.push(tok("x")["input_ids"][0]) == ""  # nothing after a stop
