import numpy as np

from benchmarks import normalisation


def patient(rng, scale):
    """A volume whose FLAIR tumour is brighter than the rest of its head, on a scanner of brightness `scale`."""
    x = rng.uniform(0.2, 0.5, (4, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((4, 32, 32), bool)
    mask[:, 10:20, 10:20] = True
    x[..., 1][mask] += 0.3
    x[:, :4] = 0  # outside the head
    mask[:, :4] = False
    return x * scale, mask


def test_volume_normalisation_lines_up_scanners_that_raw_intensities_do_not():
    rng = np.random.default_rng(0)
    result = normalisation.separability([patient(rng, 1.0), patient(rng, 0.5)], rng, per_patient=200)
    assert set(result) == {"none", "slice", "volume", "buda"}
    # within each patient the tumour is as bright as ever, so every normalisation separates it there
    assert all(r["within_flair"] > 0.95 for r in result.values())
    # pooled, the dim scanner's tumour overlaps the bright scanner's background until intensities are standardised
    assert result["none"]["pooled"][1] < 0.9 < result["volume"]["pooled"][1]
