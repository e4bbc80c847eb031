"""The serving request schema (validation, limits, regions, RLE) and the \\0-framed JSON stream."""

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from ferret import regions as R
from ferret.serve.protocol import (
    ErrorCode,
    RequestError,
    RequestLimits,
    StreamDecoder,
    build_generate_payload,
    decode_image,
    encode_chunk,
    encode_image,
    error_chunk,
    iter_messages,
    parse_generate_request,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

W, H = 64, 48


def mask_to_rle(mask):
    return R.FreeForm(mask).to_rle()


def rle_to_mask(rle):
    return R.FreeForm.from_rle(rle).mask


def make_image(width=W, height=H, fmt="PNG", seed=0) -> str:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return encode_image(image, fmt)


def payload(**overrides):
    base = {
        "model": "ferret-test",
        "prompt": "USER: <image>\nWhat is [10, 20] <region_fea> next to [5, 5, 60, 40] <region_fea>? ASSISTANT:",
        "images": [make_image()],
        "regions": [{"type": "point", "x": 10, "y": 20}, {"type": "box", "x1": 5, "y1": 5, "x2": 60, "y2": 40}],
        "temperature": 0.2,
        "top_p": 0.7,
        "max_new_tokens": 64,
        "stop": "</s>",
    }
    base.update(overrides)
    return base


def rejected(body, limits=RequestLimits()) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_generate_request(body, limits)
    return info.value


# ----------------------------------------------------------------------------------------- valid requests


def test_valid_request_parses():
    request = parse_generate_request(payload())
    assert request.image_size == (W, H)
    assert request.images[0].mode == "RGB"
    assert [(r.index, r.kind, r.coords) for r in request.regions] == [
        (0, "point", (10.0, 20.0)),
        (1, "box", (5.0, 5.0, 60.0, 40.0)),
    ]
    assert (request.temperature, request.top_p, request.max_new_tokens, request.stop, request.model) == (
        0.2,
        0.7,
        64,
        "</s>",
        "ferret-test",
    )


def test_defaults_text_only_and_numeric_strings():
    request = parse_generate_request({"prompt": "hello"})
    assert (request.images, request.regions, request.temperature, request.top_p, request.max_new_tokens) == (
        [],
        [],
        1.0,
        1.0,
        256,
    )
    assert request.stop is None and request.image_size is None
    request = parse_generate_request({"prompt": "hi", "temperature": "0.5", "max_new_tokens": "12"})
    assert (request.temperature, request.max_new_tokens) == (0.5, 12)


def test_jpeg_and_data_url_accepted_pixels_kept():
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[:, : W // 2] = (255, 0, 0)
    png = encode_image(Image.fromarray(rgb))
    image = decode_image("data:image/png;base64," + png)
    assert image.size == (W, H)
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((W - 1, 0)) == (0, 0, 0)
    assert decode_image(make_image(fmt="JPEG")).size == (W, H)


def test_polygon_mask_and_legacy_dense_masks():
    mask = np.zeros((H, W), dtype=bool)
    mask[10:20, 30:35] = True
    body = payload(
        regions=[
            {"type": "polygon", "points": [[0, 0], [20, 0], [0, 20]]},
            {"type": "mask", "rle": mask_to_rle(mask)},
        ]
    )
    polygon, dense = parse_generate_request(body).regions
    assert polygon.vertices == ((0, 0), (20, 0), (0, 20))
    assert dense.kind == "mask" and np.array_equal(dense.mask, mask)

    # the original's layout: region_masks[i][x][y]; W != H, so a wrong transpose would not even fit
    legacy = np.zeros((W, H), dtype=np.float32)
    legacy[50, 3] = 1.0  # pixel x=50, y=3
    body = payload(regions=None, region_masks=[legacy.tolist(), legacy.tolist()])
    spec = parse_generate_request(body).regions[0]
    assert spec.mask.shape == (H, W)
    assert np.argwhere(spec.mask).tolist() == [[3, 50]]


def test_region_objects_from_ferret_regions():
    regions = pytest.importorskip("ferret.regions")
    mask = np.zeros((H, W), dtype=bool)
    mask[1:4, 2:6] = True
    body = payload(
        prompt="<image> a <region_fea> b <region_fea> c <region_fea> d <region_fea>",
        regions=[
            {"type": "point", "x": 10, "y": 20},
            {"type": "box", "x1": 5, "y1": 5, "x2": 60, "y2": 40},
            {"type": "polygon", "points": [[0, 0], [20, 0], [0, 20]]},
            {"type": "mask", "rle": mask_to_rle(mask)},
        ],
    )
    point, box, polygon, free = parse_generate_request(body).region_objects()
    assert point == regions.Point(10.0, 20.0)
    assert box == regions.Box(5.0, 5.0, 60.0, 40.0)
    assert isinstance(polygon, regions.FreeForm) and polygon.mask.shape == (H, W) and polygon.mask[2, 2]
    assert not polygon.mask[19, 19]
    assert np.array_equal(free.mask, mask)
    # the client-side helpers produce a payload that parses back to the same regions
    again = parse_generate_request(
        build_generate_payload(
            "<image> <region_fea> <region_fea> <region_fea>",
            [Image.new("RGB", (W, H))],
            [point, box, free],
            stop="</s>",
        )
    ).region_objects()
    assert again[:2] == [point, box] and np.array_equal(again[2].mask, mask)


# ----------------------------------------------------------------------------------------- rejected requests


def test_corrupt_images_rejected_with_400():
    garbage = base64.b64encode(b"definitely not an image" * 10).decode()
    err = rejected(payload(images=[garbage]))
    assert err.status == 400 and "image 0 is corrupt" in err.message

    raw = base64.b64decode(make_image(128, 128))
    truncated = base64.b64encode(raw[: len(raw) // 2]).decode()
    err = rejected(payload(images=[truncated]))
    assert err.status == 400 and "image 0" in err.message

    err = rejected(payload(images=["@@@not base64@@@"]))
    assert err.status == 400 and "not valid base64" in err.message

    err = rejected(payload(images=[12345]))
    assert err.status == 400 and "base64 string" in err.message


def test_image_format_and_size_limits():
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    err = rejected(payload(images=[base64.b64encode(gif.getvalue()).decode()]))
    assert err.status == 422 and "GIF" in err.message

    err = rejected(payload(), RequestLimits(max_image_pixels=W * H - 1))
    assert err.status == 413 and f"{W}x{H}" in err.message

    err = rejected(payload(), RequestLimits(max_image_bytes=100))
    assert err.status == 413 and "100" in err.message


def test_image_token_count_must_match_images():
    err = rejected(payload(prompt="no image token <region_fea> <region_fea>"))
    assert err.status == 422
    assert err.message == "the prompt contains <image> 0 time(s) but 1 image(s) were given"
    err = rejected(payload(prompt="<image> <image>"), RequestLimits(max_images=2))
    assert err.status == 422 and "2 time(s) but 1 image(s)" in err.message
    err = rejected(payload(images=[make_image(), make_image()]))
    assert err.status == 422 and "at most 1" in err.message


def test_region_token_count_must_match_regions():
    err = rejected(payload(prompt="<image> only one <region_fea>"))
    assert err.status == 422
    assert err.message == "the prompt contains <region_fea> 1 time(s) but 2 region(s) were given"


def test_region_outside_image_names_the_region():
    point = {"type": "point", "x": 10, "y": 20}
    err = rejected(payload(regions=[point, {"type": "box", "x1": 5, "y1": 5, "x2": 65, "y2": 40}]))
    assert err.status == 422
    assert err.message.startswith("region 1 (box) corner 2 (65, 40) lies outside the image of 64x48 pixels")

    err = rejected(payload(regions=[{"type": "point", "x": W, "y": 0}, point]))
    assert err.status == 422 and err.message.startswith("region 0 (point) (64, 0) lies outside")

    polygon = {"type": "polygon", "points": [[0, 0], [10, 0], [10, -3]]}
    err = rejected(payload(regions=[polygon, polygon]))
    assert err.status == 422 and err.message.startswith("region 0 (polygon) point 2")

    legacy = np.ones((H, W)).tolist()  # [H][W] instead of [W][H]
    err = rejected(payload(regions=None, region_masks=[legacy, legacy]))
    assert err.status == 422 and "region_masks[0] has shape [W][H] = [48, 64]" in err.message


def test_malformed_and_empty_regions():
    point = {"type": "point", "x": 1, "y": 1}
    cases = [
        ({"type": "circle", "x": 1}, 400, "region 0 has type 'circle'"),
        ({"type": "point", "x": 1}, 400, "region 0 (point) field 'y' must be a number"),
        ({"type": "point", "x": True, "y": 1}, 400, "must be a number"),
        ({"type": "point", "x": float("nan"), "y": 1}, 422, "must be finite"),
        ({"type": "polygon", "points": [[0, 0], [1, 1]]}, 400, "at least 3"),
        ({"type": "mask", "rle": {"size": [H, W], "counts": "0000"}}, 400, "region 0 (mask): RLE runs cover 0 pixels"),
        ({"type": "mask", "rle": {"size": [H, W], "counts": [W * H]}}, 422, "region 0 (mask) is empty"),
        ({"type": "mask", "rle": mask_to_rle(np.ones((W, H), bool))}, 422, "= [64, 48] but the image is [48, 64]"),
    ]
    for spec, status, text in cases:
        err = rejected(payload(regions=[spec, point]))
        assert (err.status, text in err.message) == (status, True), (spec, err.message)

    err = rejected(payload(regions=[point, point], region_masks=[[[1]]]))
    assert err.status == 400 and "either" in err.message
    err = rejected(payload(prompt="<region_fea> <region_fea>", images=[]))
    assert err.status == 422 and "no image" in err.message
    err = rejected(payload(prompt="<image>" + " <region_fea>" * 3, regions=[point] * 3), RequestLimits(max_regions=2))
    assert err.status == 422 and "at most 2" in err.message


def test_generation_parameters_validated():
    limits = RequestLimits(max_new_tokens=1024)
    err = rejected(payload(max_new_tokens=5000), limits)
    assert (err.status, err.message) == (422, "'max_new_tokens' must be between 1 and 1024, got 5000")
    assert rejected(payload(max_new_tokens=0)).status == 422
    assert rejected(payload(max_new_tokens=2.5)).status == 422
    assert rejected(payload(temperature=-0.1)).message == "'temperature' must be >= 0, got -0.1"
    assert rejected(payload(top_p=0)).status == 422
    assert rejected(payload(top_p=1.5)).status == 422
    assert rejected(payload(temperature="hot")).status == 400
    assert rejected(payload(stop=7)).status == 400
    assert rejected(payload(prompt=None)).status == 400
    assert rejected(payload(prompt="x" * 10), RequestLimits(max_prompt_chars=5)).status == 413
    assert rejected(["not", "a", "dict"]).status == 400
    assert parse_generate_request(payload(temperature=0, top_p=1, max_new_tokens=1024)).temperature == 0.0


def test_request_error_as_stream_message():
    err = RequestError("region 0 (box) is bad", 422)
    assert err.to_message() == {"text": "region 0 (box) is bad", "error_code": int(ErrorCode.BAD_REQUEST)}
    assert isinstance(err, ValueError)


# ----------------------------------------------------------------------------------------- RLE


def test_rle_matches_pycocotools_and_round_trips():
    coco = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for trial in range(50):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((h, w)) < rng.random()
        expected = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert mask_to_rle(mask) == {"size": [h, w], "counts": expected["counts"].decode()}, trial
        assert np.array_equal(rle_to_mask(expected), mask)  # bytes counts, as pycocotools writes them
    assert np.array_equal(rle_to_mask({"size": [2, 3], "counts": [1, 2, 3]}), np.array([[0, 1, 0], [1, 0, 0]], bool))


def test_rle_rejects_corrupt_data():
    with pytest.raises(ValueError, match="sum to 5, expected h\\*w = 6"):
        rle_to_mask({"size": [2, 3], "counts": [1, 4]})
    with pytest.raises(ValueError, match="negative"):
        rle_to_mask({"size": [2, 3], "counts": [7, -1]})
    with pytest.raises(ValueError, match="size"):
        rle_to_mask({"size": [0, 3], "counts": []})
    with pytest.raises(ValueError, match="ends inside a number"):
        rle_to_mask({"size": [2, 3], "counts": "6o"})
    with pytest.raises(ValueError, match="outside"):
        rle_to_mask({"size": [2, 3], "counts": "6 "})


# ----------------------------------------------------------------------------------------- stream framing


def test_stream_framing_any_split():
    last = {"text": "x", "error_code": 3}
    messages = [{"text": "héllo\0world", "error_code": 0}, {"text": "日本", "error_code": 0}, last]
    data = b"".join(encode_chunk(m) for m in messages)
    assert data.count(b"\0") == 3  # a NUL inside text is escaped by JSON
    assert error_chunk("x", ErrorCode.WORKER_UNREACHABLE) == encode_chunk(last)
    for step in (1, 2, 5, len(data)):
        decoder = StreamDecoder()
        got = []
        for i in range(0, len(data), step):
            got += decoder.feed(data[i : i + step])  # splits UTF-8 sequences too
        assert got + decoder.close() == messages, step
    # the last frame may lack its terminator; empty frames are skipped
    assert list(iter_messages([b"\0", data[:-1]])) == messages


def test_stream_decoder_rejects_malformed():
    decoder = StreamDecoder()
    with pytest.raises(ValueError, match="malformed stream message 'not json'"):
        decoder.feed(b"not json\0")
    with pytest.raises(ValueError, match="JSON object"):
        StreamDecoder().feed(b"[1, 2]\0")
