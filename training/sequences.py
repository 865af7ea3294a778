"""Training examples of the sequence models (DESIGN §4): one per user, every position predicting the next item.

A user's training items in time order s_1..s_n (validation and test items are not in the training split) give the
inputs s_1..s_{n-1} and the targets s_2..s_n. Only the latest L + 1 items are kept (L = data.max_seq_len), right-
aligned: padding on the left, so the latest input sits at position L-1 as it does at serving. Batches hold users of
similar length and are trimmed to their longest row: most Beauty users have under 10 items, and a batch of them
costs a tenth of one padded to 50.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class Sequences:
    user_row: np.ndarray  # (S,) int64: users with at least two training items
    items: np.ndarray  # (S, L + 1) int64 catalog row + 1, oldest first, right-aligned, 0 = padding
    positions: np.ndarray  # (S,) valid input positions of each row (items - 1)
    times: np.ndarray  # (S, L + 1) int64 timestamps laid out like `items`, 0 = padding

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, times: np.ndarray, length: int) -> "Sequences":
        """users, items (catalog rows), times: (n,) training events in any order; equal times keep row order."""
        order = np.lexsort((np.arange(len(users)), times, users))  # (n,) by user, then time, then row
        su, si, st = users[order], items[order] + 1, times[order]
        starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]]) if len(su) else np.zeros(0, dtype=np.int64)
        counts = np.diff(np.r_[starts, len(su)])  # (U',)
        keep = counts >= 2
        starts, counts = starts[keep], counts[keep]
        width = length + 1
        take = np.minimum(counts, width)  # (S,) items kept per row
        ends = starts + counts
        cols = np.arange(width)[None, :]  # (1, L + 1)
        src = ends[:, None] - width + cols  # (S, L + 1) right-aligned: the last column is the latest item
        valid = cols >= width - take[:, None]

        def layout(values: np.ndarray) -> np.ndarray:
            return np.where(valid, values[np.where(valid, src, 0)] if len(values) else 0, 0).astype(np.int64)

        return cls(su[starts], layout(si), take - 1, layout(st))

    def __len__(self) -> int:
        return len(self.user_row)

    def batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
        """This process's batches of row indices for one epoch: rows sorted by length (ties shuffled), cut into
        batches, the batches shuffled; every rank gets as many batches (DDP steps stay in step)."""
        rng = np.random.default_rng(seed)
        by_length = np.lexsort((rng.permutation(len(self)), self.positions))
        chunks = [by_length[s : s + batch_size] for s in range(0, len(by_length), batch_size)]
        chunks = [c for c in chunks if len(c) >= 2 or self.positions[c].sum() >= 2]  # one row of one position: skip
        order = rng.permutation(len(chunks))
        per_rank = len(chunks) // world
        return [chunks[i] for i in order[rank::world][:per_rank]]

    def mean_rows(self, batch_size: int) -> float:
        """Training rows (valid positions) per batch of `batch_size` users, on average over an epoch."""
        return float(self.positions.sum()) / max(-(-len(self) // batch_size), 1)

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """inputs, targets, input times (B, T), T the longest row's positions: input t's next item is target t
        (0 = none)."""
        t = max(int(self.positions[idx].max(initial=0)), 1)
        rows = self.items[idx, -(t + 1) :]  # (B, T + 1)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        return inputs, np.where(inputs > 0, targets, 0), self.times[idx, -(t + 1) : -1]
