import numpy as np
import pandas as pd
import pytest

from benchmarks import epoch_selection


def table(rows: dict[str, list[float]]) -> pd.DataFrame:
    """train's val_dice_volume.csv from {patient: Dice per epoch}."""
    return pd.DataFrame([(epoch, patient, dice) for patient, values in rows.items()
                         for epoch, dice in enumerate(values, 1)], columns=["epoch", "patient", "dice"])


def test_every_cut_into_halves_is_used_once_in_each_direction():
    odd = epoch_selection.halves(list("abcde"))
    assert len(odd) == 2 * 10 and (["a", "b"], ["c", "d", "e"]) in odd and (["c", "d", "e"], ["a", "b"]) in odd
    even = epoch_selection.halves(list("abcd"))
    assert len(even) == 2 * 3 and sorted(map(sorted, (a + b for a, b in even))) == [list("abcd")] * 6
    assert len(epoch_selection.halves(list("abcdefghi"), limit=5)) == 10


def test_each_half_picks_the_epoch_the_other_half_is_scored_at():
    """A peaks at epoch 1, B at 3, the loss is lowest at 3: A picks epoch 1 where B scores 0.2, B picks 3 where A
    scores 0.3; at the loss's epoch B scores 0.8 and A 0.3. The whole set's Dice peaks at epoch 2 (0.65)."""
    dice = epoch_selection.dice_matrix(table({"A": [0.9, 0.7, 0.3], "B": [0.2, 0.6, 0.8]}))
    out = epoch_selection.held_out(dice, np.array([0.5, 0.45, 0.4]))
    assert out["held-out half, by Dice"] == pytest.approx((0.2 + 0.3) / 2)
    assert out["held-out half, by loss"] == pytest.approx((0.8 + 0.3) / 2)
    assert (out["epoch by loss"], out["epoch by Dice"], out["cuts"], out["epochs"]) == (3, 2, 2, 3)
    assert out["Dice at the loss's epoch"] == pytest.approx(0.55)
    assert out["Dice at the Dice's epoch"] == pytest.approx(0.65)


def test_a_run_whose_logs_disagree_on_the_epochs_is_refused():
    with pytest.raises(SystemExit, match="md-s1: 2 epochs of validation loss but 3"):
        epoch_selection.run_figures("md-s1", table({"A": [0.1, 0.2, 0.3]}), pd.DataFrame({"loss": [1.0, 0.9]}))


def test_load_reads_each_runs_committed_logs_and_names_a_run_without_them(monkeypatch):
    files = {("c1", epoch_selection.PER_PATIENT): table({"A": [0.5, 0.8], "B": [0.6, 0.7]}).to_csv(index=False),
             ("c1", epoch_selection.LOSS): "step\tloss\n0\t0.4\n1\t0.5\n",
             ("c1", "metrics/train.json"): '{"best_epoch": 2, "monitor": "val_dice_volume"}'}
    monkeypatch.setattr(epoch_selection, "git_show", lambda repo, sha, path: files.get((sha, path)))
    rows = epoch_selection.load(".", {"md-s1": "c1"})
    assert rows.loc[0, "kept"] == "2 (val_dice_volume)" and rows.loc[0, "epoch by loss"] == 1
    assert rows.loc[0, "held-out half, by Dice"] == pytest.approx((0.7 + 0.8) / 2)  # each half picks epoch 2
    assert "ahead in 1 and behind in 0" in epoch_selection.verdict(rows)
    with pytest.raises(SystemExit, match="md-s2: its commit has no"):
        epoch_selection.load(".", {"md-s2": "c2"})
