"""The web demo's logic without a browser (strokes -> regions, prompts, grounding, logs) and the drawing helpers."""

import json

import numpy as np
import pytest
from PIL import Image

from ferret import regions as R
from ferret.serve.draw import draw_annotated, draw_grounding, draw_regions, load_font, mask_outline

gws = pytest.importorskip("ferret.serve.gradio_web_server")


def editor_value(image: Image.Image, *strokes: tuple[slice, slice]):
    layer = np.zeros((image.height, image.width, 4), np.uint8)
    for rows, cols in strokes:
        layer[rows, cols] = (255, 0, 0, 255)
    return {"background": np.asarray(image.convert("RGBA")), "layers": [layer], "composite": None}


def test_strokes_become_point_box_and_sketch_regions():
    image = Image.new("RGB", (80, 60), (10, 20, 30))
    session = gws.WebSession()
    first = editor_value(image, (slice(10, 21), slice(5, 16)))
    session, text = gws.add_region(session, first, "Box", "Compare")
    assert session.regions == [("box", R.Box(5, 10, 15, 20))] and text == "Compare [region0]"
    # only the new stroke counts for the next region
    second = editor_value(image, (slice(10, 21), slice(5, 16)), (slice(30, 33), slice(40, 51)))
    session, text = gws.add_region(session, second, "Point", text + " with")
    assert session.regions[1] == ("point", R.Point(45, 31)) and text == "Compare [region0] with [region1]"
    third = editor_value(image, (slice(10, 21), slice(5, 16)), (slice(30, 33), slice(40, 51)),
                         (slice(50, 55), slice(60, 62)))
    session, _ = gws.add_region(session, third, "Sketch", "")
    kind, free = session.regions[2]
    assert kind == "sketch" and isinstance(free, R.FreeForm) and free.mask.sum() == 5 * 2
    assert gws.cache_entries(session) == [("[region0]", "box"), ("[region1]", "point"), ("[region2]", "sketch")]
    # the 80x60 picture is shown 8x (448 px or more on its short side), with a margin and a 3-line legend
    preview = gws.referring_preview(session)
    assert preview.width > 640 and preview.height > 480 + 3 * 12
    with pytest.raises(gws.UserError, match="draw on the image"):
        gws.add_region(session, third, "Box", "")  # nothing new drawn
    with pytest.raises(gws.UserError, match="upload an image"):
        gws.add_region(gws.WebSession(), None, "Box", "")
    # a different picture starts over
    session, _ = gws.add_region(session, editor_value(Image.new("RGB", (80, 60), "white"), (slice(0, 2), slice(0, 2))),
                                "Box", "")
    assert len(session.regions) == 1


def test_messages_carry_regions_in_pixels_per_message():
    """The UI sends structured messages: [regionN] (session-wide) becomes each message's own <regionK>, the regions
    travel in pixels, the image once as a data URL; no template, no coordinates text, no <region_fea>."""
    regions = [R.Box(8, 6, 40, 30), R.Point(20, 15)]
    turns = [{"from": "human", "value": "What is [region1] next to <region0> and [region1]?"},
             {"from": "gpt", "value": "A cat [100, 100, 500, 500]."},
             {"from": "human", "value": "And [region0]?"}]
    image = Image.new("RGB", (80, 60), (1, 2, 3))
    messages = gws.build_messages(turns, regions, image)
    first, second, third = messages
    assert first["role"] == "user" and first["content"][0] == {
        "type": "text", "text": "What is <region0> next to <region1> and <region0>?"}
    url = first["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert first["regions"] == [{"type": "point", "x": 20, "y": 15},
                                {"type": "box", "x1": 8, "y1": 6, "x2": 40, "y2": 30}]
    assert second == {"role": "assistant", "content": "A cat [100, 100, 500, 500]."}
    assert third == {"role": "user", "content": "And <region0>?",
                     "regions": [{"type": "box", "x1": 8, "y1": 6, "x2": 40, "y2": 30}]}
    # the worker's parser reads them back as the same regions, in pixels of the same image
    from ferret.serve.protocol import parse_chat_messages

    chat = parse_chat_messages(messages)
    assert chat.image.size == (80, 60) and chat.regions == [[regions[1], regions[0]], [], [regions[0]]]
    assert [t["from"] for t in chat.turns] == ["human", "gpt", "human"]
    with pytest.raises(gws.UserError, match=r"\[region5\] has not been drawn"):
        gws.build_messages([{"from": "human", "value": "[region5]?"}], regions, image)


def test_add_text_and_failed_answers():
    image = Image.new("RGB", (32, 32))
    session = gws.WebSession()
    with pytest.raises(gws.UserError, match="upload an image"):
        gws.add_text(session, "hi", None)
    value = editor_value(image)
    with pytest.raises(gws.UserError, match="type a question"):
        gws.add_text(session, "  <image> ", value)
    with pytest.raises(gws.UserError, match=r"\[region0\] has not been drawn"):
        gws.add_text(session, "What is [region0]?", value)
    session = gws.add_text(session, "Describe <region_fea> it.", value)
    assert session.turns == [{"from": "human", "value": "Describe  it."}]
    # the answer failed: asking again replaces the unanswered question
    session.chat.append({"role": "assistant", "content": "**error**"})
    session.answer_failed = True
    session = gws.add_text(session, "Describe the image.", value)
    assert session.turns == [{"from": "human", "value": "Describe the image."}]
    assert session.chat == [{"role": "user", "content": "Describe the image."}]


def test_grounding_from_worker_message_or_text():
    message = {"regions": [{"phrase": "a cat", "type": "box", "x1": 1, "y1": 2, "x2": 30, "y2": 40},
                           {"phrase": "its eye", "type": "point", "x": 5, "y": 6}, {"type": "mask"}]}
    found = gws.grounded_from_message(message, "", (64, 48))
    assert [(g.phrase, g.region) for g in found] == [("a cat", R.Box(1, 2, 30, 40)), ("its eye", R.Point(5, 6))]
    fallback = gws.grounded_from_message({}, "a dog [500, 500, 999, 999]", (64, 48))
    assert [(g.phrase, g.region) for g in fallback] == [("a dog", R.Box(32, 24, 63, 47))]


def test_conversation_log(tmp_path):
    log = gws.ConversationLog(str(tmp_path))
    image = Image.new("RGB", (8, 8), "red")
    path = log.save_image(image, 1_700_000_000.0)
    assert path == log.save_image(image, 1_700_000_000.0) and path.endswith(".jpg")
    written = log.write({"tstamp": 1_700_000_000.0, "type": "upvote"})
    log.write({"tstamp": 1_700_000_001.0, "type": "chat"})
    lines = [json.loads(line) for line in open(written)]
    assert [line["type"] for line in lines] == ["upvote", "chat"]


def test_example_images_show_what_their_questions_ask(tmp_path):
    paths = gws.make_example_images(str(tmp_path))
    assert len(paths) == 2 and "red circle" in gws.EXAMPLE_QUESTIONS[0]
    with Image.open(paths[0]) as image:
        assert image.size == (224, 224)
        assert image.getpixel((64, 70)) == (220, 40, 40)  # the red circle's centre


def test_small_uploads_are_shown_upscaled_and_strokes_map_back():
    image = Image.new("RGB", (56, 56), (200, 200, 200))
    session = gws.WebSession()
    assert session.set_image(image)
    shown = session.display_image()
    assert shown.size == (448, 448)  # 8x: 56 * 8 = 448
    # the editor sends back its (upscaled) background and a 1-px stroke drawn on it, inside original pixel (10, 20)
    layer = np.zeros((448, 448, 4), np.uint8)
    layer[20 * 8 + 3, 10 * 8: 10 * 8 + 8] = (255, 0, 0, 255)
    value = {"background": np.asarray(shown), "layers": [layer], "composite": None}
    session, text = gws.add_region(session, value, "Point", "")
    assert session.image.size == (56, 56) and session.regions == [("point", R.Point(10, 20))]
    assert text == "[region0]"
    # the display copy is the same picture: the conversation goes on, also after a lossy round trip
    assert not session.set_image(gws.editor_image(value))
    noisy = np.clip(np.asarray(shown).astype(int) + np.random.default_rng(0).integers(-3, 4, (448, 448, 3)), 0, 255)
    assert not session.set_image(Image.fromarray(noisy.astype(np.uint8))) and len(session.regions) == 1
    assert session.set_image(Image.new("RGB", (448, 448), "white"))  # another picture of that size is new


def test_upload_limits():
    big = {"background": np.zeros((50, 5000, 3), np.uint8), "layers": [], "composite": None}
    with pytest.raises(gws.UserError, match="5000x50 px; at most 4096"):
        gws.editor_image(big)
    with pytest.raises(gws.UserError, match="not an image"):
        gws.editor_image({"background": "/nonexistent/picture.png", "layers": []})
    args = gws.build_arg_parser().parse_args([])
    assert args.max_upload_mb == 10 and args.logdir == "runs/serve_logs"


def test_annotated_drawing_keeps_labels_off_the_picture():
    image = Image.new("RGB", (56, 56), (255, 255, 255))
    drawn = draw_annotated(image, [("a long label that would not fit", R.Box(0, 0, 55, 55))])
    assert drawn.width >= 448
    pixels = np.asarray(drawn)
    margin = (drawn.width - 448) // 2
    inside = pixels[margin + 8: margin + 440, margin + 8: margin + 440]
    assert (inside == 255).all()  # only the outline touches the picture; the label is in the legend below
    assert not (pixels[margin + 448 + margin:] == 255).all()


def test_mask_outline_is_the_boundary():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    outline = mask_outline(mask)
    assert outline.sum() == 16 and not outline[3:6, 3:6].any() and outline[2, 2:7].all()
    assert (mask_outline(mask, thickness=2) == mask & ~np.pad(np.ones((1, 1), bool), 4)).all()


def test_draw_regions_marks_each_kind():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    mask = np.zeros((80, 100), bool)
    mask[50:70, 60:90] = True
    drawn = np.asarray(draw_regions(image, [("box", R.Box(10, 10, 40, 30)), ("pt", R.Point(70, 20)),
                                            ("shape", R.FreeForm(mask))], width=1))
    white = (drawn == 255).all(axis=2)
    assert not white[30, 10:41].any()  # the box's bottom edge
    assert not white[20, 70]  # the point
    assert not white[69, 60:90].any() and white[60, 75]  # the free-form outline, hollow inside
    assert isinstance(load_font(12), object)
    grounded = [R.GroundedRegion("a cat", R.Box(1, 1, 50, 50), (0, 0, 500, 600), (0, 5))]
    assert draw_grounding(image, grounded).size == image.size
    with pytest.raises(ValueError, match="mask"):
        draw_regions(image, [("bad", R.FreeForm(np.ones((5, 5), bool)))])
