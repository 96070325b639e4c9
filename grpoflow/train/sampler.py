"""Which training prompts each generation draws: seeded epochs, resumable to the row."""

from __future__ import annotations

import torch


class PromptSampler:
    def __init__(self, num_rows: int, seed: int):
        if num_rows == 0:
            raise ValueError("the training set is empty")
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def take(self, k: int) -> list[int]:
        """The next k row indices; a new seeded permutation each epoch."""
        out = []
        while len(out) < k:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.position])
            self.position += 1
        return out

    @property
    def drawn(self) -> int:
        """Prompts taken so far, over every epoch: each drawn prompt's number in the run."""
        return self.epoch * self.num_rows + self.position

    def _permutation(self, epoch: int) -> list[int]:
        # its own generator: the global RNG (sampling) does not shift the data order, nor the reverse
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"the checkpoint was trained on {state['num_rows']} rows, this data has {self.num_rows}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
