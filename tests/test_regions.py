"""Tests for ferret/regions.py: grid conversion, text format, parsing, masks and free-form shapes."""

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferret import regions as R
from ferret.regions import (
    Box,
    FreeForm,
    GroundedRegion,
    Point,
    clamp_box,
    from_grid,
    parse_regions,
    region_mask,
    region_to_text,
    strip_regions,
    to_grid,
    validate_region,
)

FAST = settings(max_examples=300, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------------------------------------
# Grid conversion


def test_grid_hand_values():
    assert to_grid(320, 640) == 500
    assert to_grid(639, 640) == 998
    assert to_grid(0, 640) == 0
    assert to_grid(1, 640) == 1  # 1.5625 truncates
    assert from_grid(999, 640) == 639
    assert from_grid(500, 640) == 320
    assert from_grid(1, 640) == 0  # 0.64 truncates
    assert from_grid(0, 480) == 0
    assert from_grid(999, 480) == 479


def test_grid_clamps_out_of_range():
    assert to_grid(640, 640) == 999
    assert to_grid(10_000, 640) == 999
    assert to_grid(-3.5, 640) == 0
    assert from_grid(1500, 640) == 639
    assert from_grid(-20, 640) == 0
    assert from_grid(999.9, 1000) == 999


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, None])
def test_grid_rejects_bad_size(bad):
    with pytest.raises(ValueError, match="size"):
        to_grid(1, bad)
    with pytest.raises(ValueError, match="size"):
        from_grid(1, bad)


def test_grid_rejects_non_finite():
    with pytest.raises(ValueError, match="finite"):
        to_grid(float("nan"), 100)
    with pytest.raises(ValueError, match="finite"):
        from_grid(float("inf"), 100)


@FAST
@given(size=st.integers(1, 5000), frac=st.floats(0, 1, exclude_max=True))
def test_pixel_grid_pixel_within_one_cell(size, frac):
    v = frac * (size - 1)
    grid = to_grid(v, size)
    assert 0 <= grid <= 999
    back = from_grid(grid, size)
    assert 0 <= back <= size - 1
    assert abs(back - v) <= size / 1000 + 1


@FAST
@given(size=st.integers(1000, 8000), grid=st.integers(0, 999))
def test_grid_pixel_grid_moves_at_most_one(size, grid):
    # Both directions truncate (as the original), so a grid value may come back one lower, never higher.
    assert grid - 1 <= to_grid(from_grid(grid, size), size) <= grid


@FAST
@given(v=st.integers(0, 999))
def test_grid_is_identity_at_1000(v):
    assert to_grid(v, 1000) == v
    assert from_grid(v, 1000) == v


# ---------------------------------------------------------------------------------------------------------
# Boxes and text


def test_clamp_box_orders_and_clamps():
    assert clamp_box(Box(700, -10, 20, 300), 640, 480) == Box(20, 0, 639, 300)
    assert clamp_box(Box(5, 6, 7, 8), 640, 480) == Box(5, 6, 7, 8)
    with pytest.raises(ValueError, match="finite"):
        clamp_box(Box(float("nan"), 0, 1, 1), 10, 10)


def test_region_to_text_formats():
    assert region_to_text(Point(320, 240), 640, 480) == "[500, 500]"
    assert region_to_text(Box(0, 0, 639, 479), 640, 480) == "[0, 0, 998, 997]"
    # clamped to [0, W-1] x [0, H-1] first, corners ordered, as the original's regulate_box
    assert region_to_text(Box(700, 500, -4, 10), 640, 480) == "[0, 20, 998, 997]"
    mask = np.zeros((480, 640), dtype=bool)
    mask[100:201, 64:129] = True
    assert region_to_text(FreeForm(mask), 640, 480) == "[100, 208, 200, 416]"


def test_region_to_text_rejects_outside():
    with pytest.raises(ValueError, match="outside"):
        region_to_text(Point(640, 10), 640, 480)
    with pytest.raises(ValueError, match="outside"):
        region_to_text(Box(650, 0, 700, 10), 640, 480)


@FAST
@given(
    numbers=st.one_of(st.tuples(*[st.integers(0, 999)] * 2), st.tuples(*[st.integers(0, 999)] * 4)),
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
)
def test_text_parse_keeps_grid_numbers(numbers, width, height):
    text = "the thing [" + ", ".join(str(n) for n in numbers) + "] is here."
    (found,) = parse_regions(text, width, height)
    assert found.grid == numbers
    assert found.phrase == "the thing"
    assert text[found.span[0] : found.span[1]] == "[" + ", ".join(str(n) for n in numbers) + "]"
    if len(numbers) == 2:
        assert found.region == Point(from_grid(numbers[0], width), from_grid(numbers[1], height))
    else:
        region = found.region
        assert region.x1 <= region.x2 and region.y1 <= region.y2
        assert {region.x1, region.x2} == {from_grid(numbers[0], width), from_grid(numbers[2], width)}
        assert {region.y1, region.y2} == {from_grid(numbers[1], height), from_grid(numbers[3], height)}


@FAST
@given(x1=st.integers(0, 999), y1=st.integers(0, 999), x2=st.integers(0, 999), y2=st.integers(0, 999))
def test_region_text_round_trip_at_grid_resolution(x1, y1, x2, y2):
    # On a 1000x1000 image pixels and grid coincide, so text -> region -> text is exact.
    box = Box(x1, y1, x2, y2)
    text = region_to_text(box, 1000, 1000)
    (found,) = parse_regions(text, 1000, 1000)
    assert found.region == clamp_box(box, 1000, 1000)
    assert region_to_text(found.region, 1000, 1000) == text


# ---------------------------------------------------------------------------------------------------------
# Parser


def test_parse_point_and_box():
    found = parse_regions("The dog [500, 250] chases a ball [0, 0, 999, 999].", 640, 480)
    assert found == [
        GroundedRegion("The dog", Point(320, 120), (500, 250), (8, 18)),
        GroundedRegion("chases a ball", Box(0, 0, 639, 479), (0, 0, 999, 999), (33, 49)),
    ]


def test_parse_several_boxes_share_phrase():
    text = "two dogs [1, 2, 3, 4] [5, 6, 7, 8], [9, 10, 11, 12] and [13, 14, 15, 16]; a cat [20, 20, 40, 40]"
    found = parse_regions(text, 1000, 1000)
    assert [f.phrase for f in found] == ["two dogs"] * 4 + ["a cat"]
    assert [f.grid for f in found][:4] == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)]


def test_parse_phrase_boundaries():
    text = "In the image, a man [10, 10, 20, 20] holds a cup [30, 30, 40, 40] and a dog [1, 1, 2, 2].\nA tree [5, 5]"
    assert [f.phrase for f in parse_regions(text, 1000, 1000)] == ["a man", "holds a cup", "a dog", "A tree"]
    # <region_fea> is not part of a phrase; a bracket right after a full stop has an empty phrase
    text = "the object [1, 2, 3, 4] <region_fea> is a dog [5, 6, 7, 8]. [9, 9]"
    assert [f.phrase for f in parse_regions(text, 1000, 1000)] == ["the object", "is a dog", ""]


def test_parse_box_corners_ordered_grid_as_written():
    (found,) = parse_regions("x [800, 900, 100, 200]", 1000, 500)
    assert found.grid == (800, 900, 100, 200)
    assert found.region == Box(100, 100, 800, 450)


@pytest.mark.parametrize(
    "text",
    [
        "no boxes at all",
        "",
        "three numbers [1, 2, 3]",
        "five numbers [1, 2, 3, 4, 5]",
        "one number [7]",
        "empty []",
        "words [a, b, c, d]",
        "mixed [1, 2, x, 4]",
        "unclosed [12, 40",
        "stray ] bracket [",
        "nested [[1, 2], [3, 4]]",
        "nested [1, 2 [3, 4]]",
        "no commas [1 2 3 4]",
        "double comma [1,, 2]",
        "scientific [1e3, 2]",
    ],
)
def test_parse_skips_malformed(text):
    assert parse_regions(text, 640, 480) == []
    assert strip_regions(text) == " ".join(text.split())


def test_parse_continues_after_malformed():
    text = "a cat [12, 40 and a dog [1, 2, 3, 4], bad [1, 2, 3] then [[5, 6]] and [100, 200]"
    found = parse_regions(text, 1000, 1000)
    assert [f.grid for f in found] == [(1, 2, 3, 4), (100, 200)]
    assert found[0].span == (24, 36)


def test_parse_clamps_negatives_floats_and_out_of_range():
    (found,) = parse_regions("a [-5, 1000, 12.9, 2500.5]", 1000, 1000)
    assert found.grid == (0, 999, 12, 999)
    assert found.region == Box(0, 999, 12, 999)
    (found,) = parse_regions("b [ 3.7 ,+4 ]", 1000, 1000)
    assert found.grid == (3, 4)
    assert found.region == Point(3, 4)
    (found,) = parse_regions("c [.5, 999.99]", 640, 480)
    assert found.grid == (0, 999)
    assert found.region == Point(0, 479)


def test_parse_rejects_bad_image_size():
    with pytest.raises(ValueError, match="width"):
        parse_regions("[1, 2]", 0, 10)


@FAST
@given(st.text(alphabet=st.sampled_from(list("[]0123456789, .-ab\n;")), max_size=60))
def test_parse_never_crashes_and_stays_in_range(text):
    for found in parse_regions(text, 37, 53):
        assert all(0 <= g <= 999 for g in found.grid)
        assert len(found.grid) in (2, 4)
        assert text[found.span[0]] == "[" and text[found.span[1] - 1] == "]"
        coords = [found.region.x, found.region.y] if isinstance(found.region, Point) else [
            found.region.x1, found.region.x2, found.region.y1, found.region.y2
        ]
        assert all(c >= 0 for c in coords)
    strip_regions(text)


def test_strip_regions():
    assert strip_regions("A dog [10, 20, 30, 40] and a cat [5, 6] .") == "A dog and a cat."
    assert strip_regions("What is [120, 45, 300, 400] <region_fea> ?") == "What is?"
    assert strip_regions("two dogs [1, 2, 3, 4] [5, 6, 7, 8], sitting.") == "two dogs, sitting."
    assert strip_regions("keep [1, 2, 3] and [a, b]  here") == "keep [1, 2, 3] and [a, b] here"
    assert strip_regions("line one [1, 2].\nline two [3, 4, 5, 6] !") == "line one.\nline two!"


# ---------------------------------------------------------------------------------------------------------
# Masks


def test_point_mask_window_counts():
    mask = region_mask(Point(20, 30), 100, 100)
    assert mask.shape == (100, 100) and mask.dtype == np.bool_
    assert mask.sum() == 121
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (25, 35, 15, 25)
    assert region_mask(Point(0, 0), 100, 100).sum() == 36  # clipped at the corner
    assert region_mask(Point(99.9, 99.9), 100, 100).sum() == 36  # int() of the pixel coordinate
    assert region_mask(Point(2, 50), 100, 100).sum() == 8 * 11


def test_point_mask_layout_is_rows_y():
    mask = region_mask(Point(90, 5), 100, 20)
    assert mask.shape == (20, 100)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 10, 85, 95)


def test_point_mask_within_segmentation_and_box():
    seg = np.zeros((100, 100), dtype=bool)
    seg[:, 22:] = True
    assert region_mask(Point(20, 30), 100, 100, within=seg).sum() == 4 * 11
    assert region_mask(Point(20, 30), 100, 100, within=Box(18, 28, 40, 40)).sum() == 8 * 8
    assert region_mask(Point(20, 30), 100, 100, within=seg.astype(np.uint8)).sum() == 44
    with pytest.raises(ValueError, match="empty"):
        region_mask(Point(20, 30), 100, 100, within=Box(60, 60, 70, 70))
    with pytest.raises(ValueError, match="empty"):
        region_mask(Point(20, 30), 100, 100, within=np.zeros((100, 100), dtype=bool))


def test_box_mask_counts():
    assert region_mask(Box(10, 20, 19, 29), 100, 100).sum() == 100  # inclusive corners
    assert region_mask(Box(19, 29, 10, 20), 100, 100).sum() == 100  # corners ordered
    assert region_mask(Box(10.9, 20.9, 19.9, 29.9), 100, 100).sum() == 100  # int() of the corners
    assert region_mask(Box(-5, -5, 4, 4), 100, 100).sum() == 25  # clamped
    assert region_mask(Box(95, 0, 500, 0), 100, 50).sum() == 5
    rows, cols = np.nonzero(region_mask(Box(10, 20, 19, 24), 100, 100))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 24, 10, 19)


def test_box_mask_within_segmentation(caplog):
    seg = np.zeros((100, 100), dtype=bool)
    seg[25:, :15] = True
    assert region_mask(Box(10, 20, 19, 29), 100, 100, within=seg).sum() == 5 * 5
    far = np.zeros((100, 100), dtype=bool)
    far[90:, 90:] = True
    with caplog.at_level(logging.WARNING, logger="ferret.regions"):
        mask = region_mask(Box(10, 20, 19, 29), 100, 100, within=far)
    assert mask.sum() == 100
    assert "does not overlap" in caplog.text


def test_freeform_mask_is_shape():
    shape = np.zeros((40, 60), dtype=bool)
    shape[5:10, 5:10] = True
    shape[20, 30] = True
    mask = region_mask(FreeForm(shape), 60, 40)
    assert mask.sum() == 26
    assert np.array_equal(mask, shape)


def test_mask_errors():
    with pytest.raises(ValueError, match=r"Point\(x=100, y=5\).*outside"):
        region_mask(Point(100, 5), 100, 100)
    with pytest.raises(ValueError, match="outside"):
        region_mask(Point(-0.5, 5), 100, 100)
    with pytest.raises(ValueError, match="outside"):
        region_mask(Box(-10, -10, -1, -1), 100, 100)
    with pytest.raises(ValueError, match="outside"):
        region_mask(Box(10, 100, 20, 120), 100, 100)
    with pytest.raises(ValueError, match="empty"):
        region_mask(FreeForm(np.zeros((10, 10), dtype=bool)), 10, 10)
    with pytest.raises(ValueError, match=r"mask shape \(10, 10\), expected \[H, W\] = \[20, 10\]"):
        region_mask(FreeForm(np.ones((10, 10), dtype=bool)), 10, 20)
    with pytest.raises(ValueError, match=r"`within` mask .* shape \(10, 20\)"):
        region_mask(Point(1, 1), 10, 10, within=np.ones((10, 20), dtype=bool))
    with pytest.raises(ValueError, match="Point, Box or FreeForm"):
        region_mask((1, 2), 10, 10)
    with pytest.raises(ValueError, match="height"):
        region_mask(Point(1, 1), 10, 0)


def test_validate_region():
    validate_region(Point(0, 0), 1, 1)
    validate_region(Box(-5, -5, 0.5, 0.5), 1, 1)
    with pytest.raises(ValueError, match="finite"):
        validate_region(Point(float("nan"), 0), 10, 10)
    with pytest.raises(ValueError, match="must be a number"):
        validate_region(Box("1", 0, 1, 1), 10, 10)


# ---------------------------------------------------------------------------------------------------------
# FreeForm constructors


def test_freeform_validates_mask():
    with pytest.raises(ValueError, match="2-D"):
        FreeForm(np.ones((2, 3, 4), dtype=bool))
    with pytest.raises(ValueError, match="dtype"):
        FreeForm(np.array([["a", "b"]]))
    ff = FreeForm(np.array([[0, 2], [0, 0]], dtype=np.uint8))
    assert ff.mask.dtype == np.bool_ and ff.mask.sum() == 1
    assert ff.bbox == Box(1, 0, 1, 0)
    with pytest.raises(ValueError):
        ff.mask[0, 0] = True  # read-only: a region cannot change under its users
    with pytest.raises(ValueError, match="empty"):
        FreeForm(np.zeros((3, 3), dtype=bool)).bbox


def test_polygon_fill():
    square = FreeForm.from_polygon([(2, 2), (7, 2), (7, 7), (2, 7)], 10, 12)
    assert square.mask.shape == (12, 10)
    assert square.mask.sum() == 36  # vertices and edges included
    assert square.bbox == Box(2, 2, 7, 7)
    triangle = FreeForm.from_polygon([(0, 0), (9, 0), (0, 9)], 10, 10)
    assert triangle.mask.sum() == 55
    assert triangle.mask[0, 9] and triangle.mask[9, 0] and not triangle.mask[9, 9]
    with pytest.raises(ValueError, match="at least 3"):
        FreeForm.from_polygon([(0, 0), (5, 5)], 10, 10)
    with pytest.raises(ValueError, match="covers no pixel"):
        FreeForm.from_polygon([(20, 20), (30, 20), (30, 30)], 10, 10)
    with pytest.raises(ValueError, match=r"\(x, y\) pairs"):
        FreeForm.from_polygon([(0, 0, 1), (5, 5, 1), (1, 1, 1)], 10, 10)


def test_scribble_stroke():
    dot = FreeForm.from_scribble([(5, 5)], 20, 20, radius=0)
    assert dot.mask.sum() == 1 and dot.bbox == Box(5, 5, 5, 5)
    disc = FreeForm.from_scribble([(5, 5)], 20, 20, radius=2)
    assert disc.bbox == Box(3, 3, 7, 7) and disc.mask.sum() == 21
    line = FreeForm.from_scribble([(2, 5), (12, 5)], 20, 20, radius=0)
    assert line.mask.sum() == 11 and line.bbox == Box(2, 5, 12, 5)
    thick = FreeForm.from_scribble([(2, 5), (12, 5)], 20, 20, radius=1)
    assert thick.mask[4:7, 2:13].all()  # 3 px wide along its length
    assert thick.bbox == Box(1, 4, 13, 6)
    assert not thick.mask[8:].any()  # a stroke, not a filled region
    with pytest.raises(ValueError, match="radius"):
        FreeForm.from_scribble([(1, 1)], 20, 20, radius=-1)
    with pytest.raises(ValueError, match="at least 1"):
        FreeForm.from_scribble([], 20, 20)


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((17, 23)) > 0.6
    rle = FreeForm(mask).to_rle()
    assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
    assert np.array_equal(FreeForm.from_rle(rle).mask, mask)
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    assert np.array_equal(FreeForm.from_rle(as_bytes).mask, mask)


def test_rle_known_values_and_errors():
    # column-major runs: 3 zeros, 2 ones, 1 zero on a 2x3 image -> pixels (row 1, col 1) and (row 0, col 2)
    ff = FreeForm.from_rle({"size": [2, 3], "counts": [3, 2, 1]})
    assert ff.mask.tolist() == [[False, False, True], [False, True, False]]
    assert FreeForm.from_rle(ff.to_rle()).mask.tolist() == ff.mask.tolist()
    with pytest.raises(ValueError, match="'size'"):
        FreeForm.from_rle({"counts": "abc"})
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        FreeForm.from_rle({"size": [2], "counts": "abc"})
    with pytest.raises(ValueError, match="sum to 5"):
        FreeForm.from_rle({"size": [2, 3], "counts": [3, 2]})
    with pytest.raises(ValueError, match="counts"):
        FreeForm.from_rle({"size": [2, 3], "counts": 5})


def test_rle_runs_are_checked_before_decoding():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(1, 40, size=2))
        mask = rng.random((h, w)) < rng.random()
        rle = FreeForm(mask).to_rle() if mask.any() else None
        if rle is not None:
            assert np.array_equal(FreeForm.from_rle(rle).mask, mask)
    # pycocotools would "decode" these into uninitialised memory without complaint
    for counts in ("0", "1", "00"):
        with pytest.raises(ValueError, match="cover"):
            FreeForm.from_rle({"size": [4, 4], "counts": counts})
    with pytest.raises(ValueError, match="alphabet|outside"):
        FreeForm.from_rle({"size": [4, 4], "counts": "~~"})


def test_dense_wh_mask_reads_the_originals_layout_and_checks_before_building():
    # [W][H] = 3 x 2: the first index is x, so value[2][0] is the pixel at x=2, y=0 (row 0, column 2 of [H, W])
    value = [[0, 0], [0, 1], [1, 0]]
    mask = R.dense_wh_mask(value, 3, 2)
    assert mask.shape == (2, 3) and mask.dtype == bool
    assert mask.tolist() == [[False, False, True], [False, True, False]]
    with pytest.raises(ValueError, match=r"\[W\]\[H\] = \[2\]\[3\].*got 3 rows"):
        R.dense_wh_mask(value, 2, 3)  # an [H][W] list for a 2x3 image
    with pytest.raises(ValueError, match="row 1 must hold H = 2 values, got 3"):
        R.dense_wh_mask([[0, 0], [0, 0, 1], [1, 0]], 3, 2)
    with pytest.raises(ValueError, match="numbers only"):
        R.dense_wh_mask([[0, "x"], [0, 1], [1, 0]], 3, 2)
    with pytest.raises(ValueError, match="NaN or infinity"):
        R.dense_wh_mask([[0, float("nan")], [0, 1], [1, 0]], 3, 2)


def test_typed_placeholders_become_the_processors():
    assert R.typed_to_placeholders("Is [region2] left of <region0>?") == "Is <region2> left of <region0>?"
    first_mention = {}
    renumbered = R.typed_to_placeholders("[region5] and [region1], again [region5]",
                                         lambda n: first_mention.setdefault(n, len(first_mention)))
    assert renumbered == "<region0> and <region1>, again <region0>"
    assert R.grit_placeholder(3) == "<bbox_location3>" and R.drawn_placeholder(0) == "[region0]"
    with pytest.raises(ValueError, match="non-negative integer"):
        R.grit_placeholder(-1)


def test_coco_segmentation_is_checked_against_its_image_then_decoded():
    # two polygons, as COCO writes them: a 5x5 square (2..6) and a small triangle; their union
    square = R.FreeForm.from_coco_segmentation([[2, 2, 6, 2, 6, 6, 2, 6], [10, 1, 12, 1, 12, 3]], 20, 10).mask
    assert square.shape == (10, 20) and square[2:7, 2:7].all() and square[1, 10] and not square[8, 8]
    rle = R.FreeForm(square).to_rle()
    assert np.array_equal(R.FreeForm.from_coco_segmentation(rle, 20, 10).mask, square)
    with pytest.raises(ValueError, match=r"differs from the image's \[5, 20\]"):
        R.FreeForm.from_coco_segmentation(rle, 20, 5)
    with pytest.raises(ValueError, match="at least 3"):
        R.FreeForm.from_coco_segmentation([[1, 1, 5, 5]], 20, 10)
    with pytest.raises(ValueError, match="non-empty list of polygons"):
        R.FreeForm.from_coco_segmentation([], 20, 10)
