"""Helpers of the training tests."""

import pytest

from oneref.train.trainer import Trainer


@pytest.fixture
def killed_fit(monkeypatch):
    """``killed_fit(trainer, step)``: run ``trainer.fit()`` until a simulated kill in the
    step after ``step`` (its checkpoints and outputs up to then written)."""
    def run(trainer: Trainer, step: int) -> None:
        real_step = Trainer._train_step

        def dying_step(self, batch):
            if self.step == step:
                raise KeyboardInterrupt("simulated kill")
            return real_step(self, batch)

        monkeypatch.setattr(Trainer, "_train_step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
        monkeypatch.setattr(Trainer, "_train_step", real_step)

    return run
