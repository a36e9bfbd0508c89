import keras
import numpy as np
import pytest

from benchmarks.precision import rebuild
from stages.models import build_model


@pytest.mark.parametrize("norm, layer", [("slice", "standardise"), ("volume", "volume_decode")])
def test_rebuild_copies_weights_into_a_mixed_precision_twin(norm, layer):
    model = build_model("unet", (32, 32, 3), filters=4, input_norm=norm)
    twin = rebuild(model, "mixed_bfloat16", filters=4)
    assert twin.name == "unet" and twin.get_layer(layer) is not None
    assert twin.dtype_policy.name == "mixed_bfloat16" and model.dtype_policy.name == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    # the twin carries the trained weights themselves, not a fresh initialisation that happens to look alike
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), twin.get_weights()))
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(model(x), twin(x), atol=0.05)  # bfloat16 keeps ~3 significant digits
