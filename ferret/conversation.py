"""Chat templates. `ferret_v1` (alias `v1`) is reproduced exactly as the original.

A prompt is ``system + sep``, then for each message ``ROLE: text`` followed by ``sep`` after a user turn and
``sep2`` (``</s>``) after an assistant turn. An open assistant turn (``None``) is written ``ASSISTANT:``; so is an
empty message, as in the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

FERRET_SYSTEM = (
    "A chat between a human and an AI that understands visuals. In images, [x, y] denotes points: top-left [0, 0], "
    "bottom-right [width-1, height-1]. Increasing x moves right; y moves down. Bounding box: [x1, y1, x2, y2]. "
    "Image size: 1000x1000. Follow instructions. "
)


@dataclass
class Conversation:
    """A conversation in the SeparatorStyle.TWO layout of the original."""

    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    version: str = "v1"
    messages: list[list[str | None]] = field(default_factory=list)

    def append_message(self, role: str, message: str | None) -> None:
        if role not in self.roles:
            raise ValueError(f"role must be one of {self.roles}, got {role!r}")
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return copy.deepcopy(self)

    def segments(self) -> list[tuple[str, bool]]:
        """The prompt as (text, supervised) pieces: assistant answers and their ``</s>`` are supervised."""
        seps = (self.sep, self.sep2)
        pieces: list[tuple[str, bool]] = [(self.system + self.sep, False)]
        for i, (role, message) in enumerate(self.messages):
            if not message:  # None (an open turn) or "" are written the same way in the original
                pieces.append((f"{role}:", False))
                continue
            is_answer = role == self.roles[1]
            pieces.append((f"{role}: ", False))
            pieces.append((message + seps[i % 2], is_answer))
        return pieces

    def get_prompt(self) -> str:
        return "".join(text for text, _ in self.segments())


conv_ferret_v1 = Conversation(system=FERRET_SYSTEM)
conv_templates = {"ferret_v1": conv_ferret_v1, "v1": conv_ferret_v1}
default_conversation = conv_ferret_v1


def get_template(name: str) -> Conversation:
    """A fresh copy of a registered template."""
    if name not in conv_templates:
        raise KeyError(f"unknown conversation template {name!r}; known: {sorted(conv_templates)}")
    return conv_templates[name].copy()
