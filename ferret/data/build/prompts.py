"""The prompt ``ferret data generate-conversations`` sends, documented where it lives.

How a request is made (one per image):

* ``system``: ``SYSTEM_PROMPT`` below (or the file given with ``--prompt-file``).
* ``user``: the image's annotations, rendered by ``render_context``: its objects, each with its box written in
  the model's own coordinate text (``[x1, y1, x2, y2]`` on the 0..999 grid, from ferret.regions), then
  relationships between numbered objects and short region descriptions when the source has them.

What comes back must be lines starting ``User:`` or ``Assistant:`` (a turn may continue on following lines). The
user turns refer to regions and the assistant turns ground what they mention, both by copying coordinates from
the list. ``conversations.parse_reply`` maps every coordinate back to its annotated box (the pixel box of the
source, not the rounded grid), turns it into a ``<bbox_location{k}>`` placeholder of its turn, and rejects a reply
whose coordinates are not in the list, that does not alternate User/Assistant, or that fails the loaders' record
check; rejected replies are kept aside in ``unparseable.jsonl`` with the reason.
"""

from __future__ import annotations

SYSTEM_PROMPT = """\
You are an AI visual assistant looking at a single image. You do not see the image; you are given its \
annotations: a list of objects, each with a bounding box [x1, y1, x2, y2] whose numbers run from 0 (left/top) \
to 999 (right/bottom), and possibly relationships between the objects and short descriptions of regions.

Write a conversation between a User who asks about the image and an Assistant who answers as if it saw the \
image. The User refers to specific objects by writing their box, copied exactly from the list, instead of \
naming them (for example "What is the object [120, 45, 300, 400] doing?"). The Assistant answers and, every \
time it mentions an object from the list, writes that object's box right after its name (for example "a man \
[120, 45, 300, 400] holding a cup [310, 200, 360, 260]"). Ask about what the objects are, what they do, how \
they relate to each other and where they are; include at least one question that needs reasoning about \
several objects. Never invent boxes: only copy boxes from the list. Do not mention the list, the annotations \
or the coordinates' scale.

Write 3 to 5 exchanges. Put every turn on its own line, starting with "User:" or "Assistant:", User first, \
Assistant last, and nothing else."""


def render_context(objects: list[tuple[str, str]], relations: list[tuple[int, str, int]],
                   regions: list[tuple[str, str]]) -> str:
    """The user message: ``objects`` as (name, box text), ``relations`` as (subject index, predicate, object
    index) into objects, ``regions`` as (description, box text)."""
    lines = ["Objects:"]
    lines += [f"{k + 1}. {name} {box}" for k, (name, box) in enumerate(objects)]
    if relations:
        lines.append("Relationships:")
        lines += [f"- object {s + 1} {predicate} object {o + 1}" for s, predicate, o in relations]
    if regions:
        lines.append("Region descriptions:")
        lines += [f"- {box}: {text}" for text, box in regions]
    return "\n".join(lines)
