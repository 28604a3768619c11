"""Prompt-lookup drafts (`{TIER}_SPECULATIVE=ngram`): guess a sequence's next tokens from its own history.

When the last few tokens already occurred earlier in the prompt or the output (a quoted passage, code being
edited, a repeated list, JSON keys), the tokens that followed them then are a good guess for what follows now.
The engine decodes the guess together with the sequence's next token in one batch and keeps the prefix the
model agrees with (see LlamaCppChat._verify), so the output is what plain decoding gives, only sooner.

The history is kept as packed int32 bytes so `bytes.rfind` searches it in C: a 4k-token history costs
microseconds per step, with no index to build when a long prompt arrives.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

NGRAM_MAX = 4  # the longest suffix looked up; longer matches are tried first (they guess better)
NGRAM_MIN = 2  # a single repeated token guesses too badly to pay for its verification
_WIDTH = array("i").itemsize


class NgramDrafter:
    """One sequence's history and the state of its guessing."""

    def __init__(self, tokens: Iterable[int], draft_max: int) -> None:
        self._history = array("i", tokens)
        self._bytes = bytearray(self._history.tobytes())
        self.draft_max = draft_max
        self.cap = draft_max  # shrinks after rejected guesses, grows back after accepted ones
        self._skip = 0  # steps left without guessing (after a guess the model rejected outright)
        self._backoff = 1
        self.proposed = 0
        self.accepted = 0

    def append(self, token: int) -> None:
        self._history.append(token)
        self._bytes += self._history[-1:].tobytes()

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the history's longest suffix."""
        limit = min(limit, self.cap)
        if limit <= 0:
            return []
        if self._skip:
            self._skip -= 1
            return []
        history, data = self._history, self._bytes
        size = len(history)
        for n in range(min(NGRAM_MAX, size - 1), NGRAM_MIN - 1, -1):
            pattern = data[(size - n) * _WIDTH :]
            # The match must end before the last token, so at least one token follows it.
            end = (size - 1) * _WIDTH
            while True:
                at = data.rfind(pattern, 0, end)
                if at < 0:
                    break
                if at % _WIDTH == 0:  # a match across token boundaries is not a match
                    start = at // _WIDTH + n
                    guess = history[start : start + limit].tolist()
                    # An image's placeholder ids (negative) stand for embeddings: never guessed.
                    return next((guess[:i] for i, token in enumerate(guess) if token < 0), guess)
                end = at + len(pattern) - 1
        return []

    def verified(self, proposed: int, accepted: int) -> None:
        """Adapt to how much of a guess of `proposed` tokens the model kept."""
        self.proposed += proposed
        self.accepted += accepted
        if accepted == proposed:
            self.cap = min(self.draft_max, self.cap * 2)
            self._backoff = 1
        elif accepted == 0:
            # A guess the model rejects at once cost a verification for nothing: stop guessing for a while,
            # longer each time, so free text where n-grams repeat by chance runs at plain decoding's pace.
            self.cap = max(1, self.cap // 2)
            self._skip = self._backoff
            self._backoff = min(self._backoff * 2, 64)
        else:
            self.cap = max(1, accepted + 1)
            self._backoff = 1
