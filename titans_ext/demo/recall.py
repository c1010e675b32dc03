"""Synthetic long-range associative recall: the demo's task.

A sequence is a stream of two-token pairs: noise, with ``n_pairs`` facts ``key value`` written
at random places, and at the end the same keys asked again (``key value``, in another order). A
model that has kept the facts predicts each value after its asked key. The distance between a
fact and its question spans the sequence, so most answers lie far beyond an attention window
and need a memory that keeps what it saw.

Token ids: keys ``[0, n_keys)``, values ``[n_keys, n_keys + n_values)``, noise after those.
"""

from dataclasses import dataclass

import torch

from ..model.checks import check_positive_int

IGNORE = -100  # target of positions that are not scored (cross_entropy's ignore_index)


@dataclass(frozen=True)
class RecallTask:
    """Multi-query associative recall with answers at long distances.

    Args:
        seq_len: tokens per sequence (even).
        n_pairs: key/value pairs written, and later asked, per sequence.
        n_keys, n_values, n_noise: sizes of the key, value and noise vocabularies.
    """

    seq_len: int = 256
    n_pairs: int = 16
    n_keys: int = 64
    n_values: int = 64
    n_noise: int = 32

    def __post_init__(self):
        for name in ("seq_len", "n_pairs", "n_keys", "n_values", "n_noise"):
            check_positive_int(name, getattr(self, name))
        if self.seq_len % 2:
            raise ValueError(f"seq_len: expected an even number (the sequence is made of pairs), got {self.seq_len}")
        if 4 * self.n_pairs > self.seq_len:
            raise ValueError(f"n_pairs: {self.n_pairs} facts and questions need seq_len >= {4 * self.n_pairs}, "
                             f"got seq_len={self.seq_len}")
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs: at most n_keys={self.n_keys} distinct keys per sequence, got {self.n_pairs}")

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
            # Writes at distinct random pair slots before the questions, which fill the last n slots.
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
