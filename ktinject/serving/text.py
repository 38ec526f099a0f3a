"""Generated token ids to text, one delta per token, the way a client streaming the answer should see it.

Decoding each token alone is wrong for byte-level and SentencePiece tokenizers (a character split over two
tokens; a word's leading space that only shows after the previous token), and decoding everything again
per token is quadratic. So a short window is decoded: the text of the window with the new token minus the
text without it, emitted only once it no longer ends in an incomplete character. The window starts on the
last prompt tokens, so the first answer token keeps its leading space.

Stop strings: text that could be the start of a stop string is held back until it is known not to be one,
so a client never receives part of a stop string, and the streamed deltas always add up to the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"  # what tokenizers decode an unfinished UTF-8 sequence to
_CONTEXT_TOKENS = 4


class TextStream:
    """Feed token ids with ``push``; it returns the text that became final, and whether a stop string ended it."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this one are already in the emitted text
        self._stop = tuple(stop)
        self._held = ""
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The text this token makes final ("" while a character or a possible stop string is incomplete)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        if len(self._ids) > 4 * _CONTEXT_TOKENS:  # keep the id list short; only the window is ever decoded
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return self._apply_stop(delta)

    def _apply_stop(self, delta: str) -> str:
        if not self._stop:
            return delta
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = max((n for s in self._stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Text held back for a possible stop string that never came; call once when generation ends otherwise."""
        text, self._held = self._held, ""
        return text
