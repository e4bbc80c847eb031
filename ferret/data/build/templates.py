"""Question and answer templates for every task kind.

Each entry is a list; a record draws one with its seed (``BuildOptions.canonical`` takes the first). Fields:
``{region}`` / ``{region2}`` are the human turn's regions (``<bbox_location0>``, ``<bbox_location1>``),
``{boxes}`` the gpt turn's boxes (``<bbox_location0>, <bbox_location1>, ...``), and the rest are annotation text.
The loaders turn placeholders into ``[x1, y1, x2, y2] <region_fea>`` (or a point) in human turns and
``[x1, y1, x2, y2]`` in gpt turns, on the 0..999 grid, through ferret.regions.
"""

from __future__ import annotations

from ferret.regions import grit_placeholder

TEMPLATES: dict[str, dict[str, list[str]]] = {
    # objects: VG objects, COCO instances, LVIS, Objects365
    "object": {
        "refer_q": ["What is the object {region}?", "What kind of object is {region}?",
                    "Name the object in the region {region}.", "What is shown in {region}? Answer with its name."],
        "refer_a": ["{name}", "It is {article} {name}.", "{article_cap} {name}."],
        "ground_q": ["Where is the {name} in the image?", "Locate every {name} in the image.",
                     "What are the locations of {name}?", "Show me where the {name} is."],
        "ground_a": ["{name} {boxes}", "The {name}: {boxes}."],
        "absent_a": ["There is no {name} in the image.", "I cannot find any {name} in the image."],
    },
    "attribute": {
        "refer_q": ["What are the attributes of the {name} {region}?", "Describe the {name} {region} in a few words.",
                    "What does the object {region} look like?"],
        "refer_a": ["The {name} is {attributes}.", "It is {attributes}.", "{attributes} {name}"],
        "ground_q": ["Where is the {attributes} {name}?", "Locate the {attributes} {name} in the image."],
        "ground_a": ["{attributes} {name} {boxes}", "The {attributes} {name} is at {boxes}."],
    },
    "relation": {
        "refer_q": ["What is the relationship between {region} and {region2}?",
                    "How is the object {region} related to the object {region2}?"],
        "refer_a": ["The {subject} {boxes0} is {predicate} the {object} {boxes1}.",
                    "{subject} {boxes0} {predicate} {object} {boxes1}"],
        "ground_q": ["What is the {subject} {region} {predicate}?",
                     "In the image, the {subject} {region} is {predicate} something. Where is it?"],
        "ground_a": ["The {object} {boxes}.", "{object} {boxes}"],
    },
    "region": {
        "refer_q": ["Describe the region {region} in a short phrase.", "What is in the region {region}?",
                    "Give a short description of {region}."],
        "refer_a": ["{phrase}"],
        "ground_q": ['Where is "{phrase}" in the image?', "Locate the region described as: {phrase}.",
                     "Which region does this describe: {phrase}?"],
        "ground_a": ["{phrase} {boxes}", "It is at {boxes}."],
    },
    "yesno": {
        "question": ["Is there {article} {name} in the image?", "Can you see {article} {name} in the image?",
                     "Does the image contain {article} {name}?"],
        "yes": ["Yes, there is {article} {name} {boxes}.", "Yes: {name} {boxes}."],
        "no": ["No, there is no {name} in the image.", "No."],
    },
    "refexp": {
        "ground_q": ["What is the location of {expression} in the image?", "Where is {expression}?",
                     "Find {expression} in the image."],
        "ground_a": ["{expression} {boxes}"],
        "refer_q": ["Describe the object {region} so that it can be told apart from the others.",
                    "How would you refer to the object {region}?"],
        "refer_a": ["{expression}"],
    },
    "flickr": {
        "caption_q": ["Describe the image in one sentence and give the location of each object you mention.",
                      "Can you provide a description of the image and include the coordinates [x1, y1, x2, y2] "
                      "for each mentioned object?"],
        "phrases_q": ["What are the locations of {phrases}?", "Locate these in the image: {phrases}."],
        "swapped_q": ['Does this caption match the image? "{caption}"',
                      'Is this an accurate description of the image: "{caption}"?'],
        "swapped_a": ["No. There is no {wrong} in the image; it shows {right} {boxes}.",
                      "Not quite: I see {right} {boxes}, not {wrong}."],
        "swapped_unboxed_a": ["No. There is no {wrong} in the image; it shows {right}."],
    },
}


def boxes_text(n: int, start: int = 0) -> str:
    """``"<bbox_location0>, <bbox_location1>"`` for n regions from ``start``."""
    return ", ".join(grit_placeholder(k) for k in range(start, start + n))


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def fill(template: str, **fields: str) -> str:
    """The template with its fields; ``{region}``/``{region2}`` default to the first two human regions and
    ``{article}``/``{article_cap}`` follow ``name``."""
    fields.setdefault("region", "<bbox_location0>")
    fields.setdefault("region2", "<bbox_location1>")
    if "name" in fields:
        fields.setdefault("article", article(fields["name"]))
        fields.setdefault("article_cap", article(fields["name"]).capitalize())
    return template.format(**fields)
