import re

import numpy as np
import pandas as pd
import pytest

from stages.balance import augment, augmentation_sources, balance_train, plan_balance
from stages.common import BrainsegError

CFG = {"total": "auto", "tumour_fraction": 0.5, "max_rotation": 25, "blur_probability": 0.3, "blur_max_sigma": 1.0}


def test_seed_article_arithmetic():
    assert plan_balance(1373, 3929 - 1373) == (1283, 100)            # 2656 + 2656 = 5312
    assert plan_balance(1373, 2556, total=5312) == (1283, 100)
    assert plan_balance(10, 30, total=100, tumour_fraction=0.3) == (20, 40)
    assert plan_balance(50, 10, total=60) == (0, 20)                 # never drops originals
    with pytest.raises(BrainsegError, match="never dropped"):
        plan_balance(10, 10, total=15)


def test_total_as_a_multiple_grows_the_slices_that_many_fold():
    assert plan_balance(496, 1511 - 496, total="2x") == (1015, 496)   # the dev archive's training split: 3022
    assert plan_balance(10, 30, total="1.5x", tumour_fraction=0.3) == (8, 12)
    assert plan_balance(10, 30, total="1x") == (10, 0)                # originals kept: 50 slices, not 40
    with pytest.raises(BrainsegError, match="never dropped"):
        plan_balance(10, 10, total="0.5x")
    for bad in ("twice", "x", "infx", "2.5", 2.5, True):
        with pytest.raises(BrainsegError, match=f"balance.total '{bad}' is not auto, a multiple"):
            plan_balance(10, 10, total=bad)


def synthetic_index(n=3929, tumours=1373, size=16):
    """An index of n tiny slices, `tumours` of them with a centred tumour blob, 20 slices per patient."""
    rng = np.random.default_rng(0)
    tumour = np.zeros(n, bool)
    tumour[rng.choice(n, tumours, replace=False)] = True
    masks = np.zeros((n, size, size), np.uint8)
    masks[tumour, 5:11, 5:11] = 1
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    meta = pd.DataFrame({"patient": [f"P{i // 20:03d}" for i in range(n)], "case": "c", "slice": np.arange(n),
                         "image": [f"img{i}.tif" for i in range(n)], "augmentation": "",
                         "tumour": tumour.astype(int), "area": masks.reshape(n, -1).sum(1).astype(np.int64)})
    return meta, images, masks


def test_3929_slices_with_1373_tumours_become_5312_half_tumour():
    meta, images, masks = synthetic_index()
    out, out_images, out_masks = balance_train(meta, images, masks, CFG, seed=7)
    assert len(out) == len(out_images) == len(out_masks) == 5312
    assert out["tumour"].sum() == 2656
    assert (out["augmentation"] != "").sum() == 1383
    assert out.iloc[:3929].equals(meta.assign(tumour=meta["tumour"].astype(int)))  # originals first, unchanged
    assert set(np.unique(out_masks)) == {0, 1}                                   # masks stay binary


def test_augmented_copies_keep_their_source_patient_and_file():
    meta, images, masks = synthetic_index(200, 50)
    out, _, _ = balance_train(meta, images, masks, CFG, seed=1)
    source = meta.set_index("image")["patient"]
    copies = out[out["augmentation"] != ""]
    assert len(copies) and (copies["image"].map(source) == copies["patient"]).all()


def test_seeded_byte_identical():
    meta, images, masks = synthetic_index(200, 50)
    a = balance_train(meta, images, masks, CFG, seed=1)
    b = balance_train(meta, images, masks, CFG, seed=1)
    assert a[0].equals(b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def test_flip_is_an_exact_mirror_for_every_layout():
    from stages.balance import transform
    rng = np.random.default_rng(0)
    # slices, masks with and without a channel axis, one plane, and a view that is not contiguous
    for image in (rng.integers(0, 256, (32, 48, 3), np.uint8), rng.integers(0, 2, (32, 48), np.uint8),
                  rng.integers(0, 2, (32, 48, 1), np.uint8), rng.integers(0, 256, (32, 48, 4), np.uint8)[..., 1:]):
        out = transform(image, flip=True, angle=0.0)
        assert out.shape == image.shape and np.array_equal(out, image[:, ::-1])


def test_a_slice_rotates_and_deforms_to_the_bytes_of_opencvs_three_channel_warps():
    """transform rotates and deforms a slice as four channels, for speed: the bytes must be those of the plain
    3-channel warps."""
    import cv2

    from stages.balance import displacement, transform
    rng = np.random.default_rng(1)
    for h, w in ((256, 256), (37, 53)):
        image = rng.integers(0, 256, (h, w, 3), np.uint8)
        image[h // 3:, : w // 2] = 0  # flat regions as well as noise
        for angle in (-25.0, -12.3, -0.1, 0.4, 7.0, 19.9, 25.0):
            rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            assert np.array_equal(transform(image, False, angle), cv2.warpAffine(image, rot, (w, h))), (h, w, angle)
            assert np.array_equal(transform(image, True, angle, 0.7),
                                  cv2.GaussianBlur(cv2.warpAffine(image[:, ::-1].copy(), rot, (w, h)), (0, 0), 0.7))
            deformed = cv2.remap(cv2.warpAffine(image, rot, (w, h)), *displacement((h, w), 5.0, 3), cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            assert np.array_equal(transform(image, False, angle, warp=(5.0, 3)), deformed), (h, w, angle)


def test_image_and_mask_get_the_same_geometry():
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[10:20, 40:50] = 255
    mask[10:20, 40:50] = 1
    for seed in range(5):
        out_image, out_mask, how = augment(image, mask, np.random.default_rng(seed), {**CFG, "blur_probability": 0})
        bright = out_image[..., 0] > 127
        assert set(np.unique(out_mask)) <= {0, 1}
        assert (bright & (out_mask == 1)).sum() / max(1, (bright | (out_mask == 1)).sum()) > 0.8, how


def test_elastic_deformation_moves_image_and_mask_together_and_is_off_by_default():
    """balance.elastic: the original U-Net's smooth deformation (3x3 grid of displacements), the same for image and
    mask; off (0 or absent) the copies and their records are what they were before the option existed."""
    from stages.balance import displacement

    image = np.zeros((96, 96, 3), np.uint8)
    mask = np.zeros((96, 96), np.uint8)
    image[30:60, 35:65] = 255
    mask[30:60, 35:65] = 1
    cfg = {**CFG, "blur_probability": 0, "max_rotation": 0}
    plain = augment(image, mask, np.random.default_rng(4), cfg)
    assert "warp" not in plain[2]
    off = augment(image, mask, np.random.default_rng(4), {**cfg, "elastic": 0})
    assert off[2] == plain[2] and np.array_equal(off[0], plain[0]) and np.array_equal(off[1], plain[1])
    for seed in range(5):
        out_image, out_mask, how = augment(image, mask, np.random.default_rng(seed), {**cfg, "elastic": 4})
        assert re.fullmatch(r"(flip\+)?rot[+-]0\.0\+warp4:[0-9]+", how), how
        assert set(np.unique(out_mask)) <= {0, 1}
        bright = out_image[..., 0] > 127
        assert (bright & (out_mask == 1)).sum() / max(1, (bright | (out_mask == 1)).sum()) > 0.9, how
        unwarped = mask[:, ::-1] if "flip" in how else mask
        assert (out_mask != unwarped).sum() > 10, how  # the square's edges moved
    shifts = []
    for seed in range(20):
        map_x, map_y = displacement((256, 256), 5.0, seed)
        shifts.append(np.hypot(map_x - np.arange(256), map_y - np.arange(256)[:, None]).mean())
        # smooth: neighbouring pixels keep their order (no folds), so the map stays one-to-one
        assert np.diff(map_x, axis=1).min() > 0.5 and np.diff(map_y, axis=0).min() > 0.5
    assert 4.5 < np.mean(shifts) < 7  # about the sd: 5.7 px over these 20 grids (2.8 at sd 2.5, 11.4 at sd 10)
    with pytest.raises(BrainsegError, match="balance.elastic -1 is negative"):
        augmentation_sources(synthetic_index(40, 10)[0], {**CFG, "elastic": -1}, seed=0)


def index_stage_outputs(data, meta, images, masks):
    """What balance reads: data/index.csv and data/slices/*.npy (and an empty data/prepared to write into)."""
    (data / "prepared").mkdir(parents=True)
    (data / "slices").mkdir()
    np.save(data / "slices/images.npy", images)
    np.save(data / "slices/masks.npy", masks)
    meta.to_csv(data / "index.csv", index=False)


def test_write_split_refers_to_slices_and_stores_only_copies(tmp_path):
    """Balance writes no pixel of an original slice: the split's table points into data/slices, and
    stages.prepared reads back exactly what balance_train builds in memory."""
    from stages import prepared
    from stages.balance import write_split

    meta, images, masks = synthetic_index(200, 50)
    data = tmp_path / "data"
    index_stage_outputs(data, meta, images, masks)
    rows = np.arange(10, 170)  # the split's rows of the whole index
    split_meta = meta.iloc[rows].reset_index(drop=True)
    expected = balance_train(split_meta, images[rows], masks[rows], CFG, seed=3)
    written = write_split(data / "prepared", "train", split_meta, images, masks, rows, CFG, seed=3)
    plain = write_split(data / "prepared", "val", split_meta, images, masks, rows)  # no cfg: no copies
    prepared.write_record(data / "prepared", data, len(images))

    assert sorted(p.name for p in (data / "prepared").iterdir()) == [
        "slices.json", "train.csv", "train_copies_images.npy", "train_copies_masks.npy", "val.csv"]
    assert written.drop(columns=["row", "copy"]).equals(expected[0])
    copies = written[written["copy"] >= 0]
    assert len(copies) == len(expected[0]) - 160 and (copies["copy"] == np.arange(len(copies))).all()
    assert (meta["image"][copies["row"]].to_numpy() == copies["image"].to_numpy()).all()  # row: the source slice
    got_images, got_masks, table = prepared.load_split(data, "train")
    assert np.array_equal(got_images, expected[1]) and np.array_equal(got_masks, expected[2])
    pd.testing.assert_frame_equal(table, written, check_dtype=False)
    # read in chunks that straddle the originals / copies boundary, each chunk transformed as it is read
    half = lambda a, b: (a[:, ::2, ::2], b.astype(np.float16))  # noqa: E731
    for chunk in (7, 160, 1000):
        small, soft, _ = prepared.load_split(data, "train", transform=half, chunk=chunk)
        assert np.array_equal(small, expected[1][:, ::2, ::2]) and soft.dtype == np.float16
        assert np.array_equal(soft, expected[2])

    assert plain.drop(columns=["row", "copy"]).equals(split_meta) and (plain["row"] == rows).all()
    val_images, val_masks, val_table = prepared.originals(data, "val")
    assert list(val_table.index) == list(rows)  # indexed by row in data/slices: readers take just those
    assert np.array_equal(val_images[val_table.index], images[rows])
    train_images, _, train_table = prepared.originals(data, "train")
    assert len(train_table) == 160 and np.array_equal(train_images[train_table.index], images[rows])


def test_prepared_data_from_another_index_or_layout_is_refused(tmp_path):
    from stages import prepared
    from stages.balance import write_split

    meta, images, masks = synthetic_index(40, 10)
    data = tmp_path / "data"
    with pytest.raises(BrainsegError, match="val.csv: missing.*dvc repro balance"):
        prepared.load_split(data, "val")
    index_stage_outputs(data, meta, images, masks)
    write_split(data / "prepared", "val", meta.iloc[:20].reset_index(drop=True), images, masks, np.arange(20))
    prepared.write_record(data / "prepared", data, len(images))
    assert len(prepared.load_split(data, "val")[0]) == 20

    meta.iloc[:30].to_csv(data / "index.csv", index=False)  # the index stage ran again on other data
    with pytest.raises(BrainsegError, match="another .*index.csv.*dvc repro balance"):
        prepared.load_split(data, "val")
    prepared.write_record(data / "prepared", data, len(images))
    np.save(data / "slices/masks.npy", masks[:30])
    with pytest.raises(BrainsegError, match="40 images and 30 masks.*dvc repro index balance"):
        prepared.originals(data, "val")
    pd.DataFrame({"patient": ["x"]}).to_csv(data / "prepared/val.csv", index=False)  # the old layout
    with pytest.raises(BrainsegError, match="no row / copy columns.*dvc repro balance"):
        prepared.load_split(data, "val")


def test_area_weight_copies_small_tumours_more_often():
    areas = np.array([50] * 10 + [5000] * 10 + [0] * 20)
    meta = pd.DataFrame({"tumour": (areas > 0).astype(int), "area": areas})
    cfg = {"total": 200, "tumour_fraction": 0.5}
    even = augmentation_sources(meta, {**cfg, "area_weight": 0}, seed=0)
    weighted = augmentation_sources(meta, {**cfg, "area_weight": 0.5}, seed=0)
    assert len(even) == len(weighted) == 160 and (areas[weighted[80:]] == 0).all()  # then the empty copies

    def small(sources):  # copies of the ten small-tumour slices among the tumour copies
        return int(np.isin(sources[:80], np.arange(10)).sum())

    assert small(even) == 40  # each tumour slice 4 times
    assert small(weighted) > 60  # weights 1/sqrt(50) vs 1/sqrt(5000): 10x, so about 91% of the 80 copies
    with pytest.raises(BrainsegError, match="area_weight"):
        augmentation_sources(meta, {**cfg, "area_weight": -1}, seed=0)


def test_replay_gives_another_image_the_augmentation_a_copy_recorded():
    import cv2

    from stages.balance import replay
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), (0, 0), 2)
    cfg = {"max_rotation": 25, "blur_probability": 0.5, "blur_max_sigma": 1.0}
    seen = set()
    for k in range(12):
        copy, _, how = augment(image, np.zeros((64, 64), np.uint8), np.random.default_rng([0, k]),
                               {**cfg, "elastic": 3 * (k % 2)})
        seen |= {step[:4] for step in re.findall(r"flip|rot.|warp|blur", how)}
        # the angle was recorded to 0.1 degree, so the replay matches to interpolation rounding
        assert np.abs(replay(image, how).astype(int) - copy).mean() < 0.5
        planes = replay(image[..., 1:], how)  # any number of channels: the neighbours' FLAIR planes
        assert planes.shape == (64, 64, 2) and np.abs(planes.astype(int) - copy[..., 1:]).mean() < 0.5
    assert {"flip", "rot+", "rot-", "warp", "blur"} <= seen
    assert np.array_equal(replay(image, ""), image)  # an original slice
    with pytest.raises(BrainsegError, match="'flip\\+zoom1.2' is not one balance records"):
        replay(image, "flip+zoom1.2")


def test_refit_table_balances_the_validation_patients_like_the_training_split(tmp_path, monkeypatch):
    """With train.refit the stage also writes refit.csv: the validation patients only, grown and balanced as the
    training split was, their copies drawn apart from the training copies; without it, no refit table."""
    from stages import balance, prepared

    meta, images, masks = synthetic_index(400, 120)
    data = tmp_path / "data"
    index_stage_outputs(data, meta, images, masks)
    patients = sorted(meta["patient"].unique())  # 20 patients of 20 slices
    split = pd.DataFrame({"patient": patients, "split": ["train"] * 12 + ["val"] * 4 + ["test"] * 4})
    split.to_csv(data / "split.csv", index=False)
    params = {"seed": 3, "balance": CFG, "train": {"refit": True}}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(balance, "load_params", lambda: params)
    balance.main()

    refit, _ = prepared.read_table(data, "refit")
    val, _ = prepared.read_table(data, "val")
    train, _ = prepared.read_table(data, "train")
    assert set(refit["patient"]) == set(val["patient"]) == set(patients[12:16])
    assert refit[refit["copy"] < 0].drop(columns="copy").equals(val.drop(columns="copy"))  # originals first
    n_tumour = int(val["tumour"].sum())
    assert (refit["copy"] >= 0).sum() == sum(plan_balance(n_tumour, 80 - n_tumour))  # the seed's growth, balanced
    assert refit["tumour"].sum() == n_tumour + plan_balance(n_tumour, 80 - n_tumour)[0]
    n_tumour = int(train.loc[train["copy"] < 0, "tumour"].sum())
    assert len(train) == 240 + sum(plan_balance(n_tumour, 240 - n_tumour)) and len(val) == 80  # as without refit
    refit_copies = refit.loc[refit["copy"] >= 0, "augmentation"]
    train_copies = train.loc[train["copy"] >= 0, "augmentation"]
    assert len(refit_copies) and not set(refit_copies) & set(train_copies)  # a seed of their own
    x, y, table = prepared.load_split(data, "refit")  # copies readable, each with its mask
    assert len(x) == len(table) and ((y.reshape(len(y), -1).max(axis=1) > 0) == table["tumour"].astype(bool)).all()

    params["train"]["refit"] = False
    balance.main()
    assert not (data / "prepared/refit.csv").exists()


def test_refit_config_grows_the_validation_slices_as_an_exact_total_grew_training():
    from stages.balance import refit_config

    assert refit_config(CFG, 240, 80) is CFG  # auto: the seed's growth applies to any count
    assert refit_config({**CFG, "total": "2x"}, 240, 80)["total"] == "2x"  # and so does a multiple
    assert refit_config({**CFG, "total": 300}, 240, 80)["total"] == 100


def split_project(tmp_path, monkeypatch):
    """A project in tmp_path, the working directory, as balance finds it after index and split: 400 slices of 20
    patients, 12 of them training patients. Returns its data folder."""
    meta, images, masks = synthetic_index(400, 120)
    data = tmp_path / "data"
    index_stage_outputs(data, meta, images, masks)
    patients = sorted(meta["patient"].unique())
    pd.DataFrame({"patient": patients, "split": ["train"] * 12 + ["val"] * 4 + ["test"] * 4}).to_csv(
        data / "split.csv", index=False)
    monkeypatch.chdir(tmp_path)
    return data


def test_balance_seed_draws_other_copies_on_the_same_split_and_null_is_the_top_level_seed(tmp_path, monkeypatch):
    from stages import balance, prepared

    data = split_project(tmp_path, monkeypatch)

    def copies(seed, balance_seed):
        monkeypatch.setattr(balance, "load_params", lambda: {"seed": seed, "train": {},
                                                             "balance": {**CFG, "seed": balance_seed}})
        balance.main()
        return prepared.read_table(data, "train")[0]

    top = copies(3, None)
    assert copies(9, 3).equals(top)  # the copies follow balance.seed alone; the split is data/split.csv's
    other = copies(3, 4)
    assert len(other) == len(top) and other["tumour"].sum() == top["tumour"].sum()
    assert not other["augmentation"].equals(top["augmentation"])
    for bad in (-1, 1.5, "seven", True):
        with pytest.raises(BrainsegError, match=f"balance.seed {bad!r} is not a whole number"):
            copies(3, bad)
    assert prepared.read_table(data, "train")[0].equals(other)  # a refused seed left the last good outputs


def test_balance_seed_members_draws_each_member_the_copies_a_run_of_its_seed_draws(tmp_path, monkeypatch):
    import json

    from stages import balance, prepared

    data = split_project(tmp_path, monkeypatch)

    def run(balance_seed, members=None, train_seed=None, profile="cpu"):
        profiles = {"cpu": {}, "demo": {"members": None}}  # as params.yaml's: the demo profile trains one network
        params = {"seed": 3, "train": {"members": members, "seed": train_seed}, "profiles": profiles,
                  "profile": profile, "balance": {**CFG, "seed": balance_seed}}
        monkeypatch.setattr(balance, "load_params", lambda: params)
        balance.main()
        folder = data / "prepared"
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != prepared.RECORD}

    alone = {seed: run(seed) for seed in (5, 9)}
    ensemble = run("members", [5, 9])
    # the first member's draw is train.csv, the second's train_seed9.csv: each byte for byte its seed's run's
    for name in ("train.csv", "train_copies_images.npy", "train_copies_masks.npy", "val.csv", "test.csv"):
        assert ensemble[name] == alone[5][name], name
    for kind in (".csv", "_copies_images.npy", "_copies_masks.npy"):
        assert ensemble[f"train_seed9{kind}"] == alone[9][f"train{kind}"], kind
        assert alone[9][f"train{kind}"] != alone[5][f"train{kind}"]
    assert (prepared.member_table(data, 5), prepared.member_table(data, 9)) == ("train", "train_seed9")
    summary = json.loads((tmp_path / "metrics/balance.json").read_text())
    assert summary["train_seed9"] == summary["train"]  # the same class counts, other copies
    with pytest.raises(BrainsegError, match="members \\[5, 9\\], not for seed 7.*dvc repro balance"):
        prepared.member_table(data, 7)

    with pytest.raises(BrainsegError, match="train.seed 9 is set beside the seed ensemble.*train.members=null"):
        run("members", [5, 9], train_seed=9)
    assert (data / "prepared/train_seed9.csv").read_bytes() == ensemble["train_seed9.csv"]  # the last good outputs
    run(None, [5, 9])  # one shared draw again: every member trains on train.csv, and the members' tables are gone
    assert prepared.member_table(data, 9) == "train" and not (data / "prepared/train_seed9.csv").exists()
    # one network: its seed's draw, train.seed's or else the top-level seed's; a profile's members: null wins
    assert run("members", train_seed=9) == alone[9]
    assert run("members", [5, 9], profile="demo") == run(3) != alone[5]
