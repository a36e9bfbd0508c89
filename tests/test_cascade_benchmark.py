import keras
import numpy as np
import pytest

from benchmarks import cascade
from stages.common import BrainsegError
from tests.test_quantisation_benchmark import SIZE, make_data


def flair_member(bias):
    """sigmoid(40 FLAIR - bias): with bias 20 perfect on make_data's slices; lower biases also call fainter pixels."""
    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs), name="unet")
    conv.set_weights([np.array([0.0, 40.0, 0.0]).reshape(1, 1, 3, 1), np.array([-bias])])
    return model


def test_every_gate_is_timed_and_scored_on_validation_against_the_whole_ensemble(tmp_path, project, capsys):
    from stages.models import average

    data = make_data(tmp_path)
    average([flair_member(20.0), flair_member(20.0), flair_member(5.0)]).save(tmp_path / "model.keras")
    cascade.main(["--model", str(tmp_path / "model.keras"), "--data", str(data), "--gates", "0.5", "0.99",
                  "--repeats", "1"])
    out = capsys.readouterr().out
    assert "3 members" in out and "30 validation and test slices (6 patients)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["none"], ["0.5"],
                                                                                               ["0.99"])}
    assert list(rows) == ["none", "0.5", "0.99"]
    # each patient's three tumour slices of five pass, and the two slices beside them
    assert [rows[g][2] for g in rows] == ["100.0%", "100.0%", "100.0%"]
    for row in rows.values():
        assert float(row[1]) > 0
        assert all(0 <= float(v) <= 1 for v in row[3:8])
    # where the first member calls no tumour, the third's faint calls are left out: no patient's Dice falls
    assert float(rows["0.5"][3]) >= float(rows["none"][3])
    assert out.count("the whole ensemble (") == 2 and "target >= 150" in out


def test_one_network_is_refused(tmp_path, project):
    data = make_data(tmp_path)
    flair_member(20.0).save(tmp_path / "model.keras")
    with pytest.raises(BrainsegError, match="not a seed ensemble"):
        cascade.main(["--model", str(tmp_path / "model.keras"), "--data", str(data)])
