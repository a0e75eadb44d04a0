"""Shared by the kill-and-resume tests of every task: a run killed right after a checkpoint."""

import pytest


class Killed(Exception):
    """Stands for the process being killed."""


def kill_after_epoch(trainer, epoch: int) -> None:
    """Run ``trainer.fit()`` and stop it (as a kill would) right after it saves epoch ``epoch``'s checkpoint."""
    original_save = trainer.save

    def save_then_die():
        path = original_save()
        if trainer.epoch == epoch:
            raise Killed
        return path

    trainer.save = save_then_die
    with pytest.raises(Killed):
        trainer.fit()
