"""Synthetic long-range associative recall: the demo's task.

A sequence is a stream of two-token pairs: noise, with ``n_pairs`` facts ``key value`` written
in it, and at the end the same keys asked again (``key value``, in another order). A model
that has kept the facts predicts each value after its asked key. Two layouts:

- ``"scattered"`` (the demo): the facts at random places before the questions, so the distance
  between a fact and its question spans the sequence. With one pair this is a needle in a
  haystack.
- ``"front"``: multi-query associative recall (MQAR, Zoology): the facts first, then
  ``filler`` noise tokens, then the questions, so every answer lies at least ``filler`` tokens
  back. :meth:`RecallTask.mqar` builds it from the filler length.

Most answers lie far beyond an attention window and need a memory that keeps what it saw.

Token ids: keys ``[0, n_keys)``, values ``[n_keys, n_keys + n_values)``, noise after those.
"""

import dataclasses
from dataclasses import dataclass

import torch

from ..model.checks import check_choice, check_nonnegative_int, check_positive_int

IGNORE = -100  # target of positions that are not scored (cross_entropy's ignore_index)


LAYOUTS = ("scattered", "front")


@dataclass(frozen=True)
class RecallTask:
    """Multi-query associative recall with answers at long distances.

    Args:
        seq_len: tokens per sequence (even).
        n_pairs: key/value pairs written, and later asked, per sequence.
        n_keys, n_values, n_noise: sizes of the key, value and noise vocabularies.
        layout: ``"scattered"`` (facts at random places) or ``"front"`` (facts first, MQAR).
    """

    seq_len: int = 256
    n_pairs: int = 16
    n_keys: int = 64
    n_values: int = 64
    n_noise: int = 32
    layout: str = "scattered"

    def __post_init__(self):
        for name in ("seq_len", "n_pairs", "n_keys", "n_values", "n_noise"):
            check_positive_int(name, getattr(self, name))
        check_choice("layout", self.layout, LAYOUTS)
        if self.seq_len % 2:
            raise ValueError(f"seq_len: expected an even number (the sequence is made of pairs), got {self.seq_len}")
        if 4 * self.n_pairs > self.seq_len:
            raise ValueError(f"n_pairs: {self.n_pairs} facts and questions need seq_len >= {4 * self.n_pairs}, "
                             f"got seq_len={self.seq_len}")
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs: at most n_keys={self.n_keys} distinct keys per sequence, got {self.n_pairs}")

    @classmethod
    def mqar(cls, n_pairs=4, filler=64, n_keys=64, n_values=64, n_noise=64):
        """MQAR: ``n_pairs`` facts, ``filler`` (even) noise tokens, then the questions."""
        check_positive_int("n_pairs", n_pairs)
        check_nonnegative_int("filler", filler)
        if filler % 2:
            raise ValueError(f"filler: expected an even number (the sequence is made of pairs), got {filler}")
        return cls(4 * n_pairs + filler, n_pairs, n_keys, n_values, n_noise, layout="front")

    @property
    def filler(self):
        """Noise tokens per sequence."""
        return self.seq_len - 4 * self.n_pairs

    def resized(self, seq_len):
        """The same task (vocabularies, pairs, layout) at another sequence length."""
        return dataclasses.replace(self, seq_len=seq_len)

    @property
    def vocab_size(self):
        return self.n_keys + self.n_values + self.n_noise

    def sample(self, batch_size, generator=None):
        """``batch_size`` sequences -> ``(tokens, targets, distances)``, each ``[batch_size, seq_len]`` int64.

        ``targets`` holds the value to predict at each asked key's position (the next token) and
        IGNORE elsewhere; ``distances`` the tokens between that answer and its write (0 elsewhere).
        """
        check_positive_int("batch_size", batch_size)
        n_slots, n = self.seq_len // 2, self.n_pairs
        noise = self.n_keys + self.n_values + torch.randint(self.n_noise, (batch_size, self.seq_len), generator=generator)
        tokens = noise
        targets = torch.full((batch_size, self.seq_len), IGNORE, dtype=torch.long)
        distances = torch.zeros(batch_size, self.seq_len, dtype=torch.long)
        for row in range(batch_size):
            # Writes at distinct pair slots before the questions, which fill the last n slots.
            if self.layout == "front":
                write = 2 * torch.arange(n)
            else:
                write = 2 * torch.randperm(n_slots - n, generator=generator)[:n]
            ask = 2 * (n_slots - n + torch.arange(n))
            keys = torch.randperm(self.n_keys, generator=generator)[:n]
            values = self.n_keys + torch.randint(self.n_values, (n,), generator=generator)
            ask = ask[torch.randperm(n, generator=generator)]
            for position in (write, ask):
                tokens[row, position] = keys
                tokens[row, position + 1] = values
            targets[row, ask] = values
            distances[row, ask] = ask - write
        return tokens, targets, distances
