import numpy as np
import pytest

from stages import metrics

E = [[0, 0, 0], [0, 0, 0]]
FULL = [[1, 1, 1], [1, 1, 1]]
# Five 2x3 slices: patient P1 (three slices) then P2 (two). Hand counts per slice:
#   P1 s0: truth 4 px, prediction 3 px overlapping 2 -> tp 2, fp 1, fn 2, Dice 4/7
#   P1 s1: both empty                                  -> Dice 1
#   P1 s2: truth empty, 1 px predicted                -> fp 1, Dice 0
#   P2 s0: all tumour, all predicted                  -> tp 6, Dice 1
#   P2 s1: 1 px of tumour, nothing predicted          -> fn 1, Dice 0
TRUTH = np.array([[[1, 1, 0], [1, 1, 0]], E, E, FULL, [[1, 0, 0], [0, 0, 0]]], bool)
PRED = np.array([[[1, 1, 1], [0, 0, 0]], E, [[1, 0, 0], [0, 0, 0]], FULL, E], bool)
PATIENTS = ["P1", "P1", "P1", "P2", "P2"]


def counts():
    return metrics.slice_counts(TRUTH, PRED, PATIENTS)


def test_slice_counts():
    c = counts()
    assert c.tp.tolist() == [2, 0, 0, 6, 0]
    assert c.fp.tolist() == [1, 0, 1, 0, 0]
    assert c.fn.tolist() == [2, 0, 0, 0, 1]
    assert c.patient.tolist() == PATIENTS


def test_dice_per_slice_scores_empty_slices():
    assert metrics.dice_per_slice(TRUTH, PRED) == pytest.approx([4 / 7, 1, 0, 1, 0])


def test_dice_per_volume_pools_each_patients_slices():
    # P1: tp 2, fp 2, fn 2 -> 4/8; P2: tp 6, fn 1 -> 12/13
    per_volume = metrics.dice_per_volume(counts())
    assert per_volume.to_dict() == pytest.approx({"P1": 0.5, "P2": 12 / 13})


def test_dice_per_volume_groups_rows_that_are_not_consecutive():
    order = [0, 3, 1, 4, 2]
    c = metrics.slice_counts(TRUTH[order], PRED[order], np.array(PATIENTS)[order])
    assert metrics.dice_per_volume(c).to_dict() == pytest.approx({"P1": 0.5, "P2": 12 / 13})


def test_segmentation_scores_by_hand():
    s = metrics.segmentation_scores(counts())
    assert s["dice_volume_mean"] == pytest.approx((0.5 + 12 / 13) / 2)
    assert s["dice_volume_median"] == pytest.approx((0.5 + 12 / 13) / 2)
    assert s["dice_slice_mean"] == pytest.approx((4 / 7 + 1 + 0 + 1 + 0) / 5)
    assert s["dice_slice_tumour_mean"] == pytest.approx((4 / 7 + 1 + 0) / 3)
    # pooled: tp 8, fp 2, fn 3
    assert s["dice_pixel"] == pytest.approx(16 / 21)
    assert s["iou"] == pytest.approx(8 / 13)
    assert s["precision"] == pytest.approx(8 / 10)
    assert s["recall"] == pytest.approx(8 / 11)
    assert s["tversky"] == pytest.approx(8 / (8 + 0.7 * 3 + 0.3 * 2))


def test_empty_truth_and_prediction_is_perfect_and_has_no_tumour_mean():
    empty = np.zeros((3, 4, 4), bool)
    s = metrics.segmentation_scores(metrics.slice_counts(empty, empty, ["a", "a", "b"]))
    assert s.pop("dice_slice_tumour_mean") is None
    assert all(v == 1.0 for v in s.values())


def test_all_tumour_masks():
    full = np.ones((2, 4, 4), bool)
    perfect = metrics.segmentation_scores(metrics.slice_counts(full, full, ["a", "b"]))
    assert all(v == 1.0 for v in perfect.values())
    missed = metrics.segmentation_scores(metrics.slice_counts(full, ~full, ["a", "b"]))
    assert all(v == 0.0 for v in missed.values())


def test_tumour_predicted_on_empty_truth_scores_zero():
    truth = np.zeros((1, 4, 4), bool)
    pred = truth.copy()
    pred[0, 1, 1] = True
    s = metrics.segmentation_scores(metrics.slice_counts(truth, pred, ["a"]))
    assert s["dice_volume_mean"] == s["dice_slice_mean"] == s["precision"] == 0.0
    assert s["recall"] == 0.0 and s["dice_slice_tumour_mean"] is None


def test_per_patient_table_worst_first():
    table = metrics.per_patient_table(counts())
    assert table.columns.tolist() == ["patient", "slices", "dice", "true_volume", "predicted_volume"]
    assert table.patient.tolist() == ["P1", "P2"]
    assert table.slices.tolist() == [3, 2]
    assert table.dice.tolist() == pytest.approx([0.5, 12 / 13])
    assert table.true_volume.tolist() == [4, 7]
    assert table.predicted_volume.tolist() == [4, 6]


def test_detection_scores_by_hand():
    present = [1, 1, 0, 0]
    predicted = [1, 0, 0, 1]
    score = [0.9, 0.4, 0.1, 0.6]  # positive-negative pairs ranked right: 3 of 4
    d = metrics.detection_scores(present, predicted, score)
    assert d == pytest.approx({"accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5, "roc_auc": 0.75,
                               "tp": 1, "fp": 1, "fn": 1, "tn": 1})


def test_detection_with_one_class_has_no_auc():
    d = metrics.detection_scores([1, 1], [1, 0], [0.9, 0.2])
    assert d["roc_auc"] is None and d["specificity"] is None and d["sensitivity"] == 0.5
    assert metrics.roc_points([1, 1], [0.9, 0.2]).empty


def test_roc_points_and_confusion_rows():
    roc = metrics.roc_points([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3])
    assert roc.columns.tolist() == ["fpr", "tpr"]
    assert roc.iloc[0].tolist() == [0, 0] and roc.iloc[-1].tolist() == [1, 1]
    rows = metrics.confusion_rows([1, 0], [0, 0])
    assert rows.to_dict("list") == {"actual": ["tumour", "no tumour"], "predicted": ["no tumour", "no tumour"]}
