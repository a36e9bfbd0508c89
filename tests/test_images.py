import io

import numpy as np
import pytest
import tifffile

from stages import images
from stages.images import BadImage


def tiff_bytes(array, **kwargs) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, **kwargs)
    return out.getvalue()


VARIANTS = [{}, {"bigtiff": True}, {"byteorder": ">"}, {"compression": "zlib", "predictor": 2},
            {"rowsperstrip": 7}]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=["plain", "bigtiff", "big-endian", "deflate", "strips"])
@pytest.mark.parametrize("shape", [(40, 30, 3), (40, 30)], ids=["rgb", "mask"])
def test_quick_header_read_and_decode_agree_with_tifffile(kwargs, shape, tmp_path):
    array = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    data = tiff_bytes(array, **kwargs)
    assert images.tiff_size(lambda at, n: data[at:at + n]) == (40, 30)
    path = tmp_path / "x.tif"
    path.write_bytes(data)
    assert np.array_equal(images._decode_tiff(path, path), tifffile.imread(path))
    assert np.array_equal(images._decode_tiff(io.BytesIO(data), "x.tif"), array)


@pytest.mark.parametrize("data", [b"", b"not a tiff at all", b"II*\x00\xff\xff\xff\x7f" + b"\x00" * 8,
                                  b"MM\x00\x2a\x00\x00\x00\x08\x00"], ids=["empty", "text", "far-ifd", "cut-ifd"])
def test_quick_header_read_gives_up_on_what_it_cannot_read(data):
    assert images.tiff_size(lambda at, n: data[at:at + n]) is None


def test_declared_bomb_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    data = bytearray(tiff_bytes(np.zeros((40, 30), np.uint8)))
    at = data.index(b"\x00\x01\x04\x00")  # the ImageWidth entry (tag 256, type LONG), little-endian
    data[at + 8:at + 12] = (2_000_000).to_bytes(4, "little")
    path = tmp_path / "bomb.tif"
    path.write_bytes(bytes(data))
    monkeypatch.setattr(images.cv2, "imread", lambda *a: pytest.fail("decoded a bomb"))
    with pytest.raises(BadImage, match="more than the .* allowed"):
        images.read_mask(path)


def test_an_ifd_offset_past_any_file_falls_back_to_tifffile_and_names_the_file(tmp_path):
    path = tmp_path / "far.tif"
    path.write_bytes(b"II+\x00\x08\x00\x00\x00" + b"\xff" * 8)  # BigTIFF whose first IFD is at 2**64 - 1
    with pytest.raises(BadImage, match="far.tif: is not a readable TIFF"):
        images.read_image(path)


def test_unreadable_file_names_itself(tmp_path):
    path = tmp_path / "gone.tif"
    with pytest.raises(BadImage, match="gone.tif: is not a readable TIFF"):
        images.read_image(path)
