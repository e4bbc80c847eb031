"""Negative mining: questions about things that are not in the image, answered with a grounded no.

* ``AbsentNames``: candidate names for "Is there a ... ?" / "Where is the ... ?" questions. A candidate is never a
  name, a synonym (another name of the same annotated object) or a WordNet synset of anything annotated in the
  image, so "puppy" is not asked about an image with a "dog.n.01". Exhaustively labelled sources (COCO,
  Objects365) may use any absent category; LVIS, whose labels are not exhaustive, only its verified
  ``neg_category_ids``; Visual Genome the most frequent names of the whole file (read in a first pass).
* ``swap_phrase``: for Flickr30k captions, a phrase of the same entity type from other images whose head word
  appears nowhere in this image's captions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ferret.data.build.common import Draws


class AbsentNames:
    """A vocabulary of names (most frequent first) with their synsets."""

    def __init__(self, names: Iterable[str], synsets: dict[str, set[str]] | None = None):
        self.names = list(dict.fromkeys(names))
        self.synsets = synsets or {}

    @classmethod
    def from_counts(cls, counts: Counter, synsets: dict[str, set[str]], size: int) -> "AbsentNames":
        names = [n for n, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]
        return cls(names, {n: synsets.get(n, set()) for n in names})

    def draw(self, present_names: set[str], present_synsets: set[str], k: int, draws: Draws) -> list[str]:
        """Up to ``k`` names absent from the image, drawn with the image's seed."""
        if k <= 0:
            return []
        present_words = {w for name in present_names for w in name.split()}
        candidates = [n for n in self.names
                      if n not in present_names and not (self.synsets.get(n, set()) & present_synsets)
                      and n.split()[-1] not in present_words]
        return draws.sample(candidates, k)


def swap_phrase(phrase_type: str, image_words: set[str], vocab: dict[str, list[str]], draws: Draws) -> str | None:
    """A phrase of ``phrase_type`` from ``vocab`` whose head word is not among ``image_words``, or None."""
    candidates = [p for p in vocab.get(phrase_type, []) if p.split()[-1] not in image_words]
    return draws.rng.choice(candidates) if candidates else None
