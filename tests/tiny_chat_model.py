"""A tiny chat model directory built in code: random Qwen3-MoE weights, a character tokenizer with a chat template.

Shared by the serving and command-line tests (the server, `chat` and `generate` need a tokenizer with a template).
"""

from __future__ import annotations

from tiny_models import tiny_model

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?()'\"\n-"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """One token per character, <eos> = 2; with a chat template unless ``chat_template`` is None."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def save_tiny_model_dir(path, *, chat_template: str | None = CHAT_TEMPLATE, max_positions: int = 512, **overrides):
    """Write config, random weights and tokenizer to ``path``; returns the in-memory model."""
    tokenizer = tiny_tokenizer(chat_template)
    model = tiny_model(
        "qwen3_moe",
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
        **overrides,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
