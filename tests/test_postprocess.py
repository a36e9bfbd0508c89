import json

import numpy as np

from stages import postprocess


def blank(n=1, size=8):
    return np.zeros((n, size, size), bool)


def test_threshold_is_strictly_above():
    assert postprocess.threshold(np.array([0.2, 0.5, 0.51]), 0.5).tolist() == [False, False, True]


def test_remove_small_components_keeps_big_ones_and_joins_diagonals():
    masks = blank(2)
    masks[0, 0, 0] = True                # 1 px: dropped
    masks[0, 4:6, 4:6] = True            # 4 px: kept
    masks[1, 0, 0] = masks[1, 1, 1] = True  # diagonal neighbours: one 2 px component, kept
    out = postprocess.remove_small_components(masks, 2)
    assert out[0].sum() == 4 and out[0, 4:6, 4:6].all()
    assert out[1].sum() == 2
    assert (postprocess.remove_small_components(masks, 0) == masks).all()


def test_keep_largest_3d_joins_slices():
    volume = blank(3)
    volume[0, 1:3, 1:3] = True   # 4 px ...
    volume[1, 3:5, 3:5] = True   # ... touching diagonally across slices: one 8-voxel object
    volume[2, 5:8, 6:8] = True   # 6 px, the biggest 2D piece but the smaller 3D object
    out = postprocess.keep_largest_3d(volume)
    assert out[:2].sum() == 8 and not out[2].any()


def test_largest_3d_per_patient_keeps_one_object_per_patient():
    masks = blank(4)
    masks[0, 0:2, 0:2] = True    # patient a: 4 px
    masks[2, 5:6, 5:6] = True    # patient a: 1 px, dropped
    masks[1, 0, 0] = True        # patient b: 1 px, dropped
    masks[3, 4:8, 4:8] = True    # patient b: 16 px, not touching row 1's pixel
    out = postprocess.largest_3d_per_patient(masks, ["a", "b", "a", "b"])
    assert out[0].sum() == 4 and not out[2].any()
    assert not out[1].any() and out[3].sum() == 16
    # without patients every slice is its own volume
    assert (postprocess.largest_3d_per_patient(masks) == masks).all()


def test_postprocess_applies_the_params_steps():
    probs = np.zeros((2, 8, 8), np.float32)
    probs[0, 0, 0] = 0.9                 # isolated pixel
    probs[0, 3:6, 3:6] = 0.8             # 9 px object
    probs[1, 3:6, 3:6] = 0.4             # below threshold
    params = {"threshold": 0.5, "min_component": 0, "largest_3d": False}
    assert postprocess.postprocess(probs, params).sum() == 10
    assert postprocess.postprocess(probs, {**params, "min_component": 2}).sum() == 9
    assert postprocess.postprocess(probs, {**params, "largest_3d": True}, ["p", "p"]).sum() == 9
    assert postprocess.postprocess(probs, {**params, "threshold": 0.3}, ["p", "p"]).sum() == 19


def test_tumour_present_scales_the_minimum_area_to_the_slice_size():
    masks = blank(3, size=512)
    masks[1, :2, :10] = True                       # 20 px
    masks[2, :4, :10] = True                       # 40 px: the 10 px of a 256 px slice are 40 px here
    params = {"detection_min_area": 10}
    assert postprocess.tumour_present(masks, params).tolist() == [False, False, True]
    assert postprocess.tumour_present(masks, {"detection_min_area": 0}).tolist() == [False, True, True]


def test_serving_settings_follow_the_evaluation_choice(tmp_path):
    from stages.postprocess import serving_settings
    params = {"threshold": 0.5, "min_component": 0, "largest_3d": False, "tta_flip": False,
              "choose_on_validation": True}
    eval_json = tmp_path / "eval.json"
    assert serving_settings(params, eval_json) == params  # nothing evaluated yet: as set
    eval_json.write_text(json.dumps({"postprocess": {"threshold": 0.5, "min_component": 64, "largest_3d": True,
                                                     "tta_flip": True, "chosen_on_validation": "tta_flip"}}))
    served = serving_settings(params, eval_json)
    # an evaluation from before tta_affine existed did not choose it
    assert (served["min_component"], served["largest_3d"], served["tta_flip"], served["tta_affine"]) == \
        (64, True, True, False)
    eval_json.write_text(json.dumps({"postprocess": {"threshold": 0.5, "min_component": 64, "largest_3d": True,
                                                     "tta_flip": True, "tta_affine": True,
                                                     "chosen_on_validation": "tta_affine"}}))
    assert serving_settings(params, eval_json)["tta_affine"] is True
    assert serving_settings({**params, "choose_on_validation": False}, eval_json)["tta_flip"] is False
    eval_json.write_text(json.dumps({"classifier_accuracy": 0.9, "postprocess": {"threshold": 0.5}}))
    assert serving_settings(params, eval_json) == params


def test_min_position_empties_each_patients_lowest_slices_before_largest_3d():
    from stages.postprocess import drop_low_slices, postprocess
    probs = np.zeros((6, 4, 4), np.float32)
    probs[:, 1:3, 1:3] = 0.9  # a prediction on every slice
    probs[0, :, :] = 0.9      # patient A's lowest slice: a large false positive
    patients = ["A"] * 4 + ["B"] * 2
    masks = drop_low_slices(probs > 0.5, patients, 0.3)
    # A's slices sit at 0, 1/3, 2/3, 1 and B's at 0, 1: only each one's lowest slice is below 0.3
    assert masks.reshape(6, -1).any(axis=1).tolist() == [False, True, True, True, False, True]
    assert np.array_equal(drop_low_slices(probs > 0.5, None, 0.3), probs > 0.5)  # no patients: nowhere to place
    assert np.array_equal(drop_low_slices(probs > 0.5, patients, 0), probs > 0.5)
    params = {"threshold": 0.5, "largest_3d": True, "min_position": 0.3}
    out = postprocess(probs, params, patients)
    assert out.sum() == 4 * 4  # 2x2 on A's slices 1-3 and B's top slice; slice 0's blob went first
    assert postprocess(probs, {**params, "min_position": 0}, patients)[0].all()  # off: the blob is kept
