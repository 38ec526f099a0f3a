"""The model behind ``ktinject demo``: a tiny Qwen3-MoE and a character tokenizer, built in code.

The model is trained for a few seconds to memorize one sentence, so the demo can show real text coming out
of the optimized model (a random model would print noise and prove less). Everything is deterministic.
Training runs on one torch thread: for a model this small, more threads only add OpenMP hand-offs (measured
5-10x slower per step at 2 threads than at 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

DEMO_TEXT = "ktinject runs stock generate() on hybrid CPU/GPU mixture-of-experts models. "
_CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?()/-'\""


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(_CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def demo_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    steps: int = 80,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> PreTrainedModel:
    """A 2-layer, 8-expert Qwen3-MoE trained for ``steps`` AdamW steps on DEMO_TEXT (about a second or two on a
    CPU); ``progress(step, steps, loss)`` is called after each step."""
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Eight windows of the repeated sentence, starting at evenly spaced characters: the sentence from its start
    # (what the default prompt continues) and from a few other offsets.
    ids = torch.tensor(tokenizer(DEMO_TEXT * 3)["input_ids"])
    window = 80
    starts = torch.linspace(0, len(DEMO_TEXT) - 1, 8).long()
    batch = torch.stack([ids[s : s + window] for s in starts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for step in range(steps):
            loss = model(batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(step + 1, steps, loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
