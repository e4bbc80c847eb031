"""Question/answer builders shared by several sources: objects (refer + ground + absent) and yes/no existence."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ferret.data.build.common import QA, Draws, Target, negatives_for
from ferret.data.build.negatives import AbsentNames
from ferret.data.build.templates import TEMPLATES, boxes_text, fill


@dataclass
class NamedObject:
    """An annotated object: its main name, its other names (synonyms), its synsets and its region."""

    name: str
    target: Target
    synonyms: tuple[str, ...] = ()
    synsets: tuple[str, ...] = field(default_factory=tuple)


def clean_name(name: str) -> str:
    """Lower case, underscores as spaces, single spaces (``"Traffic_light "`` -> ``"traffic light"``)."""
    return " ".join(str(name).replace("_", " ").lower().split())


def dedupe(objects: list[NamedObject]) -> list[NamedObject]:
    """Objects without exact (name, box) repeats, in order."""
    seen, out = set(), []
    for obj in objects:
        key = (obj.name, tuple(obj.target.box))
        if key not in seen:
            seen.add(key)
            out.append(obj)
    return out


def group_by_name(objects: list[NamedObject]) -> dict[str, list[NamedObject]]:
    groups: dict[str, list[NamedObject]] = {}
    for obj in objects:
        groups.setdefault(obj.name, []).append(obj)
    return groups


def present(objects: list[NamedObject]) -> tuple[set[str], set[str]]:
    names = {n for o in objects for n in (o.name, *o.synonyms)}
    return names, {s for o in objects for s in o.synsets}


def _groundable(objects: list[NamedObject], stats: Counter, task: str, max_instances: int):
    """(name, objects of that name) for every name with at most ``max_instances`` instances; the others are
    counted as ``{task}_skipped_too_many_instances``."""
    for name, group in group_by_name(objects).items():
        if len(group) > max_instances:
            stats[f"{task}_skipped_too_many_instances"] += 1
            continue
        yield name, group


def _absent_qas(objects: list[NamedObject], absent: AbsentNames | None, asked: int, share: float, draws: Draws,
                question: list[str], answer: list[str]) -> list[QA]:
    """Questions about names absent from the image, ``share`` of all (``asked`` present ones), answered no."""
    if absent is None:
        return []
    names, synsets = present(objects)
    return [QA(fill(draws.pick(question), name=name), fill(draws.pick(answer), name=name), negative=True)
            for name in absent.draw(names, synsets, negatives_for(asked, share, draws), draws)]


def object_qas(objects: list[NamedObject], draws: Draws, stats: Counter, absent: AbsentNames | None,
               share: float, max_instances: int) -> list[QA]:
    """Refer to every object ("What is the object <r>?" -> name), ground every name ("Where is the dog?" ->
    boxes of all dogs), and ask about absent names at ``share`` of the grounding questions."""
    t = TEMPLATES["object"]
    qas = [QA(fill(draws.pick(t["refer_q"])), fill(draws.pick(t["refer_a"]), name=o.name), [o.target], [])
           for o in objects]
    grounding = [QA(fill(draws.pick(t["ground_q"]), name=name),
                    fill(draws.pick(t["ground_a"]), name=name, boxes=boxes_text(len(group))),
                    [], [o.target for o in group])
                 for name, group in _groundable(objects, stats, "ground", max_instances)]
    qas += grounding
    qas += _absent_qas(objects, absent, len(grounding), share, draws, t["ground_q"], t["absent_a"])
    return draws.shuffle(qas)


def yesno_qas(objects: list[NamedObject], draws: Draws, stats: Counter, absent: AbsentNames | None,
              share: float, max_instances: int) -> list[QA]:
    """"Is there a dog in the image?": yes with the dogs' boxes for present names, no for absent ones, the
    latter making ``share`` of the questions."""
    t = TEMPLATES["yesno"]
    qas = [QA(fill(draws.pick(t["question"]), name=name),
              fill(draws.pick(t["yes"]), name=name, boxes=boxes_text(len(group))),
              [], [o.target for o in group])
           for name, group in _groundable(objects, stats, "yesno", max_instances)]
    qas += _absent_qas(objects, absent, len(qas), share, draws, t["question"], t["no"])
    return draws.shuffle(qas)
