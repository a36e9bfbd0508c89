import pandas as pd

from benchmarks.architectures import COLUMNS, row, table

SEGMENTER = {"dice_volume_mean": 0.7, "dice_volume_median": 0.8, "dice_slice_mean": 0.85, "dice_slice_tumour_mean": 0.6,
             "dice_pixel": 0.75, "postprocess": {"chosen_on_validation": "largest_3d"},
             "postprocess_compare": {"threshold": {"dice_volume_mean": 0.65, "dice_slice_mean": 0.8}},
             "detection": {"accuracy": 0.9, "sensitivity": 0.8, "specificity": 0.95, "roc_auc": 0.93},
             "model": {"name": "unet", "parameters": 493345, "slices_per_second": 97.4}}
TRAIN = {"epochs": 20, "best_epoch": 18, "train_seconds": 2157.6, "train_slices_per_s": 19.62}


def test_segmenter_row_reports_the_headline_and_the_raw_mean():
    r = row("unet-cpu", SEGMENTER, TRAIN, pd.DataFrame({"dice": [0.0, 0.0, 0.9]}))
    assert r["per-volume Dice mean"] == "**0.700**" and r["mean without post-processing"] == "0.650"
    assert r["post-processing"] == "largest_3d" and r["worst"] == "0.000 (2 patients)"
    assert r["params"] == "493,345" and r["epochs (best)"] == "20 (18)" and r["train min"] == "36.0"
    assert r["detection acc. (sens. / spec., AUC)"] == "0.900 (0.800 / 0.950, 0.930)"


def test_classifier_row_has_detection_only():
    classifier = {"classifier_accuracy": 0.8, "classifier_sensitivity": 0.7, "classifier_specificity": 0.9,
                  "classifier_roc_auc": 0.85, "model": {"name": "cnn", "parameters": 2417, "slices_per_second": 595}}
    r = row("cnn-cpu", classifier, TRAIN, None)
    assert r["per-volume Dice mean"] == "-" and r["detection acc. (sens. / spec., AUC)"].startswith("0.800 (0.700")
    lines = table([r]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == len(COLUMNS) + 1 == lines[2].count("|")
