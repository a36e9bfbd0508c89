import keras
import numpy as np
import pandas as pd
import pytest

from benchmarks import quantisation
from tests.conftest import write_data

SIZE = 32


def flair_model():
    """Tumour where the FLAIR (middle) channel is bright: perfect on the data below, at a fixed input size."""
    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, conv(inputs), name="unet")
    conv.set_weights([np.array([0.0, 40.0, 0.0]).reshape(1, 1, 3, 1), np.array([-20.0])])
    return model


def make_data(root):
    """Three patients of five slices in each split; a 10x10 tumour, FLAIR 255 on it, on slices 1-3."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, (45, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((45, SIZE, SIZE), np.uint8)
    tables = {}
    for k, split in enumerate(("train", "val", "test")):
        rows = []
        for p in range(3):
            for s in range(5):
                i = 15 * k + 5 * p + s
                if s in (1, 2, 3):
                    masks[i, 8:18, 10:20] = 1
                images[i, ..., 1][masks[i] == 1] = 255
                rows.append({"patient": f"TCGA_CS_{4941 + 3 * k + p}", "slice": s + 1, "row": i, "copy": -1,
                             "tumour": int(s in (1, 2, 3))})
        tables[split] = pd.DataFrame(rows)
    return write_data(root / "data", images, masks, tables)


def test_calibration_takes_up_to_n_slices_of_each_training_patient_as_the_network_takes_them(tmp_path):
    data = make_data(tmp_path)
    x = quantisation.calibration_inputs(flair_model(), data, per_patient=2)
    assert x.shape == (6, SIZE, SIZE, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert quantisation.calibration_inputs(flair_model(), data, per_patient=9).shape[0] == 15  # 5 a patient
    again = quantisation.calibration_inputs(flair_model(), data, per_patient=2)
    np.testing.assert_array_equal(x, again)  # the same draw each run


def test_each_graph_is_scored_like_the_evaluate_stage_and_compared_with_float32(tmp_path, project, capsys):
    data = make_data(tmp_path)
    flair_model().save(tmp_path / "model.keras")
    quantisation.main(["--model", str(tmp_path / "model.keras"), "--data", str(data), "--calibration", "2",
                       "--batch", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split()[:1] and line.split()[0] in quantisation.GRAPHS and "against" not in line}
    assert list(rows) == list(quantisation.GRAPHS)
    for name, row in rows.items():
        network, rate, val_threshold, val_chosen = map(float, row[1:5])
        assert network > 0 and rate > 0
        assert val_threshold == pytest.approx(1.0) and val_chosen == pytest.approx(1.0)  # a perfect model stays so
        assert float(row[6]) == pytest.approx(1.0)  # test
    assert "calibrated on 6 training slices, litert_int8 on 96 synthetic ones" in out
    assert all(f"{name} against float32: network" in out for name in quantisation.GRAPHS[1:])
