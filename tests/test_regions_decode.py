"""Region decoders (COCO RLE, polygons) check sizes and counts before anything of the mask's size is allocated."""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils
from serve_helpers import coco_rle_counts

from ferret.regions import MAX_MASK_PIXELS, FreeForm, check_rle


def bomb() -> dict:
    """An RLE declaring a 10^6 x 10^6 mask whose runs do cover all 10^12 pixels, in under 150 bytes."""
    runs = [0] + [7_812_500_000] * 128  # 128 x 7.8125e9 = 1e12
    return {"size": [1_000_000, 1_000_000], "counts": coco_rle_counts(runs)}


def test_rle_string_matches_pycocotools():
    mask = np.zeros((7, 5), dtype=np.uint8)
    mask[1:4, 2:5] = 1
    mask[6, 0] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))
    flat = mask.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    assert coco_rle_counts(runs) == encoded["counts"].decode("ascii")


def test_rle_bomb_is_refused_before_decoding():
    rle = bomb()
    assert len(rle["counts"]) < 150
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"\[1000000, 1000000\] is 1000000000000 pixels, more than the limit"):
        FreeForm.from_rle(rle)
    with pytest.raises(ValueError, match=r"differs from the image's \[480, 640\]"):
        FreeForm.from_rle(rle, image_size=(640, 480))
    with pytest.raises(ValueError, match="more than the limit"):
        check_rle(rle)
    assert time.perf_counter() - start < 1.0  # a guard only: the checks allocate nothing of the mask's size


def test_limits_are_the_callers_choice():
    mask = np.zeros((30, 40), dtype=bool)
    mask[3:9, 5:20] = True
    rle = FreeForm(mask).to_rle()
    assert np.array_equal(FreeForm.from_rle(rle, image_size=(40, 30)).mask, mask)
    with pytest.raises(ValueError, match="1200 pixels, more than the limit of 1000"):
        FreeForm.from_rle(rle, max_pixels=1000)
    with pytest.raises(ValueError, match=r"differs from the image's \[40, 30\]"):
        FreeForm.from_rle(rle, image_size=(30, 40))  # (W, H) swapped
    assert FreeForm.from_rle(rle, max_pixels=None).mask.sum() == 6 * 15
    assert MAX_MASK_PIXELS >= 8192 * 8192


@pytest.mark.parametrize("counts, message", [
    ([3136.5], "must be integers, run 0 is 3136.5"),
    ([6.0, 6], "must be integers, run 0 is 6.0"),
    ([True, 11], "must be integers"),
    (["6", 6], "must be integers"),
    ([-1, 13], "negative run length"),
    ([5, 6], "sum to 11, expected h\\*w = 12"),
    ([0] * 14, "14 runs, more than an \\[3, 4\\] mask can have"),
])
def test_uncompressed_counts_must_be_integers_covering_the_mask(counts, message):
    with pytest.raises(ValueError, match=message):
        FreeForm.from_rle({"size": [3, 4], "counts": counts})
    assert FreeForm.from_rle({"size": [3, 4], "counts": [5, 7]}).mask.sum() == 7


@pytest.mark.parametrize("counts, message", [
    ("", "empty"),
    ("0é", "non-ASCII"),
    ("0" * 100, "100 characters, more than an \\[3, 4\\] mask can need"),
    ("p", "outside '0'..'o'"),
    ("0b", "ends inside a number"),
    ("05", "cover 5 pixels"),
])
def test_compressed_counts_are_checked(counts, message):
    with pytest.raises(ValueError, match=message):
        FreeForm.from_rle({"size": [3, 4], "counts": counts})


@pytest.mark.parametrize("size", [[0, 5], [5], [2.0, 3], [True, 3], "3x4", None, [-3, 4]])
def test_bad_sizes_are_named(size):
    with pytest.raises(ValueError, match="'size' must be \\[h, w\\] with positive integers"):
        FreeForm.from_rle({"size": size, "counts": [12]})


def test_polygon_canvas_is_bounded():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="1000000x1000000 is 1000000000000 pixels, more than the limit"):
        FreeForm.from_polygon([(0, 0), (10, 0), (10, 10)], 1_000_000, 1_000_000)
    assert time.perf_counter() - start < 1.0
    assert FreeForm.from_polygon([(0, 0), (4, 0), (4, 4)], 8, 8).mask.any()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.one_of(json_values, st.lists(st.integers(-2, 2**21), min_size=2, max_size=2)),
    counts=st.one_of(json_values, st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120), max_size=40),
                     st.lists(st.integers(-3, 60), max_size=12)),
)
def test_any_json_rle_decodes_to_its_size_or_is_a_value_error(size, counts):
    """Whatever a data file or a client sends as an RLE: a mask of the declared size, or ValueError, fast."""
    start = time.perf_counter()
    try:
        mask = FreeForm.from_rle({"size": size, "counts": counts}, max_pixels=4096).mask
    except ValueError:
        pass
    else:
        assert mask.shape == tuple(size) and mask.size <= 4096
    assert time.perf_counter() - start < 1.0
