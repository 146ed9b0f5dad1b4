"""decode_image: every odd mode, EXIF, animation, truncation, bombs, non-images."""
import numpy as np
import pytest
from PIL import Image, ImageFile

from raytimm.data.images import DEFAULT_MAX_PIXELS, decode_image, to_rgb_array
from raytimm.errors import DataError, ImageError, ImageTooLargeError
from tests import helpers_images as H


def _decode(kind, **kwargs):
    return decode_image(H.odd_image(kind), name=kind, **kwargs)


@pytest.mark.parametrize("kind", H.DECODABLE)
def test_decodable_kinds_give_rgb_uint8(kind):
    arr = _decode(kind)
    assert arr.dtype == np.uint8
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert arr.flags.c_contiguous and arr.flags.writeable


def test_grayscale_is_replicated_to_three_channels():
    arr = _decode("gray_l")
    assert (arr == 100).all()


@pytest.mark.parametrize("kind,opaque", [("rgba", H.RED), ("la", (0, 0, 0)), ("palette_transparency", H.BLUE)])
def test_transparency_is_composited_on_white(kind, opaque):
    arr = _decode(kind)
    assert tuple(arr[0, 0]) == opaque  # left half opaque
    assert tuple(arr[0, -1]) == H.WHITE  # right half transparent -> white


def test_cmyk_is_converted_to_rgb():
    arr = _decode("cmyk")
    assert np.abs(arr[4, 4].astype(int) - np.array(H.RED)).max() <= 3


def test_16bit_png_is_scaled_not_clipped():
    arr = _decode("png16")
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, -1]) == (128, 128, 128)


def test_mode_i_and_f_are_scaled_sensibly():
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))  # mode I with 16-bit range
    assert wide.mode == "I"
    assert to_rgb_array(wide)[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    narrow = Image.fromarray(np.array([[0, 200]], dtype=np.int32))  # 8-bit values in an I image stay as is
    assert to_rgb_array(narrow)[0, :, 0].tolist() == [0, 200]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert to_rgb_array(unit)[0, :, 0].tolist() == [0, 128, 255]
    ranged = Image.fromarray(np.array([[-10.0, 10.0]], dtype=np.float32))
    assert to_rgb_array(ranged)[0, :, 0].tolist() == [0, 255]


def test_exif_orientation_is_applied():
    arr = _decode("exif_rotated")
    assert arr.shape == (40, 20, 3)  # stored 40 wide x 20 high, displayed rotated
    top, bottom = arr[2, 10].astype(int), arr[-3, 10].astype(int)
    assert top[0] > 200 and top[2] < 50  # red on top
    assert bottom[2] > 200 and bottom[0] < 50  # blue at the bottom


def test_animated_gif_gives_first_frame():
    arr = _decode("animated_gif")
    assert tuple(arr[0, 0]) == H.RED


def test_tiny_and_very_wide_images():
    assert _decode("one_by_one").shape == (1, 1, 3)
    assert _decode("very_wide").shape == (2, 4000, 3)


def test_path_and_bytes_decode_identically(tmp_path):
    path = H.write_image(tmp_path / "x.png", "rgba")
    assert np.array_equal(decode_image(path), decode_image(path.read_bytes()))
    assert np.array_equal(decode_image(str(path)), decode_image(path.read_bytes()))


@pytest.mark.parametrize("kind", H.UNDECODABLE)
def test_undecodable_bytes_raise_image_error_naming_upload(kind):
    with pytest.raises(ImageError) as info:
        decode_image(H.odd_image(kind))
    assert type(info.value) is ImageError
    assert str(info.value).startswith("upload:")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png"])
def test_truncated_file_raises_error_naming_the_file(tmp_path, kind):
    path = H.write_image(tmp_path / f"broken{H.ODD_IMAGES[kind][1]}", kind)
    with pytest.raises(ImageError, match="truncated") as info:
        decode_image(path)
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        decode_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="directory"):
        decode_image(tmp_path)


def test_bomb_is_refused_before_decoding():
    data = H.odd_image("bomb_png")
    assert len(data) < 2000  # header says 30000x30000, the file is tiny
    with pytest.raises(ImageTooLargeError, match="30000x30000") as info:
        decode_image(data, name="bomb.png")
    assert "bomb.png" in str(info.value)
    assert isinstance(info.value, ImageError) and isinstance(info.value, DataError)


def test_pixel_limit_is_checked_before_load():
    # The IDAT of this 3000x3000 file holds only 4 rows: had load() run first, it would fail as
    # "truncated". Getting the size error proves the limit is checked on the header alone.
    data = H.bomb_png(3000, 3000)
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 1,000,000"):
        decode_image(data, max_pixels=1_000_000)
    with pytest.raises(ImageError, match="truncated") as info:
        decode_image(data, max_pixels=DEFAULT_MAX_PIXELS)
    assert type(info.value) is ImageError


def test_our_limit_is_the_authority_above_pillows_default():
    # Pillow alone would refuse 900 MP (its hard limit is ~179 MP); with a higher limit of ours the
    # header passes and the file then fails as the truncated file it is.
    with pytest.raises(ImageError) as info:
        decode_image(H.bomb_png(), max_pixels=1_000_000_000)
    assert type(info.value) is ImageError


def test_limit_exactly_at_size_is_allowed():
    arr = decode_image(H.rgb_png(10, 10), max_pixels=100)
    assert arr.shape == (10, 10, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(H.rgb_png(10, 10), max_pixels=99)
