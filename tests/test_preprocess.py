import numpy as np
import pytest

from stages.preprocess import standardise_volume, volume_stats


def decoded(code):
    return (code.astype(np.float64) - 128) / 32


def volume(seed=0):
    images = np.random.default_rng(seed).integers(20, 200, (5, 16, 16, 3), dtype=np.uint8)
    images[:, :4] = 0  # outside the head
    return images


def test_standardise_volume_z_scores_each_channel_over_the_head_of_the_whole_volume():
    images = volume()
    images[0, 4:] += 40  # one brighter slice stays brighter: the scale is the volume's, not each slice's
    out = standardise_volume(images)
    assert out.dtype == np.uint8 and (out[:, :4] == 0).all() and (out[:, 4:] > 0).all()
    z = decoded(out[:, 4:]).reshape(-1, 3)
    assert np.allclose(z.mean(axis=0), 0, atol=0.02) and np.allclose(z.std(axis=0), 1, atol=0.02)
    assert decoded(out[0, 4:]).mean() > decoded(out[1:, 4:]).mean() + 0.5


def test_a_copy_standardised_with_its_volume_statistics_matches_the_volume():
    images = volume()
    assert np.array_equal(standardise_volume(images[:2], volume_stats(images)), standardise_volume(images)[:2])
    assert not np.array_equal(standardise_volume(images[:2]), standardise_volume(images)[:2])


def test_standardise_volume_ignores_a_linear_change_of_scanner_scale():
    images = volume()
    dimmer = (images // 2).astype(np.uint8)
    dimmer[:, :4] = 0
    assert np.abs(decoded(standardise_volume(dimmer)[:, 4:]) - decoded(standardise_volume(images)[:, 4:])).max() < 0.1


def test_slice_positions_run_bottom_to_top_per_patient_and_a_lone_slice_sits_in_the_middle():
    from stages.preprocess import slice_positions
    positions = slice_positions(["a", "a", "a", "b", "c", "c"])
    assert np.allclose(positions, [0, 0.5, 1, 0.5, 0, 1])


def test_add_position_appends_a_constant_uint8_plane_and_keeps_the_pixels():
    from stages.preprocess import add_position, resize_images
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    out = add_position(images, [0.0, 0.5, 1.0])
    assert out.dtype == np.uint8 and out.shape == (3, 8, 8, 4)
    assert np.array_equal(out[..., :3], images)
    assert [np.unique(p).tolist() for p in out[..., 3]] == [[0], [128], [255]]
    assert np.array_equal(resize_images(out, 4)[..., 3], out[:, :4, :4, 3])  # resizing keeps the plane
    with pytest.raises(ValueError, match="2 slice positions for 3 slices"):
        add_position(images, [0.0, 1.0])


def test_neighbour_rows_stay_in_their_patients_volume_and_repeat_its_end_slices():
    from stages.preprocess import neighbour_places, neighbour_rows
    assert neighbour_places(4, 1).tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]
    assert neighbour_places(3, 2).tolist() == [[0, 0, 1, 2], [0, 0, 2, 2], [0, 1, 2, 2]]
    assert neighbour_rows(["a", "a", "a", "b", "c", "c"], 1).tolist() == [[0, 1], [0, 2], [1, 2], [3, 3], [4, 5],
                                                                          [4, 5]]


def test_add_neighbours_appends_the_flair_of_the_named_slices():
    from stages.preprocess import FLAIR, add_neighbours, neighbour_rows, resize_images
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    out = add_neighbours(images, neighbour_rows(["a"] * 4, 1))
    assert out.dtype == np.uint8 and out.shape == (4, 8, 8, 5)
    assert np.array_equal(out[..., :3], images)
    assert np.array_equal(out[2, ..., 3], images[1, ..., FLAIR])
    assert np.array_equal(out[2, ..., 4], images[3, ..., FLAIR])
    assert np.array_equal(out[3, ..., 4], images[3, ..., FLAIR])  # the top slice stands in for the one above it
    # resizing is per channel (OpenCV rounds more than four channels' area sums its own way: up to one level)
    assert np.abs(resize_images(out, 4)[..., :3].astype(int) - resize_images(images, 4)).max() <= 1
    with pytest.raises(ValueError, match="2 neighbour rows for 4 slices"):
        add_neighbours(images, [[0, 1], [0, 2]])


def test_warp_slices_rotates_about_the_centre_and_its_inverse_undoes_it():
    from stages.preprocess import warp_slices

    x = np.zeros((2, 33, 33, 3), np.uint8)
    x[:, 4:12, 14:19] = 200                   # a bar above the centre
    assert np.array_equal(warp_slices(x, 90, 1.0), np.rot90(x, axes=(1, 2)))  # counter-clockwise, as cv2 turns
    blob = np.exp(-((np.arange(33)[:, None] - 12) ** 2 + (np.arange(33)[None] - 10) ** 2) / 30.0)
    maps = np.stack([blob, blob[::-1]]).astype(np.float32)
    for angle, scale in ((10, 1.0), (-10, 1.0), (0, 0.9), (0, 1.1)):
        there = warp_slices(maps, angle, scale)
        assert np.abs(there - maps).max() > 0.15   # the blob moved
        back = warp_slices(there, angle, scale, inverse=True)
        assert np.abs(back - maps).max() < 0.05     # and came back, up to two bilinear interpolations


def test_a_pixel_is_head_when_any_one_channel_is_above_the_threshold():
    from stages.preprocess import HEAD
    images = np.zeros((1, 2, 3, 3), np.uint8)
    images[0, 0, 0] = (HEAD, HEAD, HEAD)  # at the threshold in every channel: background
    images[0, 0, 1] = (0, 0, HEAD + 1)  # one channel above it: head
    images[0, 1] = (HEAD + 50, 0, HEAD + 100)
    out = standardise_volume(images)
    assert (out[0, 0, 0] == 0).all() and (out[0, 0, 2] == 0).all()
    assert (out[0, 0, 1] > 0).all() and (out[0, 1] > 0).all()


def test_network_input_standardises_each_patients_volume_on_its_own():
    from stages.models import build_model
    from stages.preprocess import network_input
    model = build_model("unet", (16, 16, 3), 4, input_norm="volume")
    a, b = volume(1), volume(2) // 2  # b darker: pooled statistics would change both volumes' codes
    assert np.array_equal(network_input(model, a, np.zeros(5)), standardise_volume(a))
    both = network_input(model, np.concatenate([a, b]), np.array(["A"] * 5 + ["B"] * 5))
    assert np.array_equal(both, np.concatenate([standardise_volume(a), standardise_volume(b)]))
