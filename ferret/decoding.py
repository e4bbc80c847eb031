"""Decoding settings: one type for the servers, the CLI and the benchmarks.

``DecodingSettings`` holds what a request or a benchmark run asks of ``generate`` and has one definition of greedy:
a temperature at or below ``GREEDY_TEMPERATURE`` (1e-4, the original worker's threshold) takes the argmax; above
it, tokens are sampled from softmax(logits / T), restricted to the nucleus ``top_p`` and never to a top-k (the
original's sampling). ``to_generation_config()`` turns it into a ``transformers.GenerationConfig``;
``generate_kwargs()`` gives the same settings as keyword arguments of ``generate`` (which lets the model add its own,
such as suppressing ``<region_fea>``). Stop strings go to ``generate`` as ``stop_strings`` (``generate`` then needs
the tokenizer as well).

Transformers is imported only by ``to_generation_config``, so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GREEDY_TEMPERATURE = 1e-4  # at or below: argmax


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode one answer.

    Args:
        temperature: at or below ``GREEDY_TEMPERATURE`` greedy, above it sampling at this temperature.
        top_p: nucleus of the sampling distribution; 1 (or None) keeps every token. Ignored when greedy.
        max_new_tokens: most tokens to generate (servers lower it to fit the context).
        stop: strings that end the answer; the answer is cut before the first one.
        seed: seeds torch's generator before sampling (``None``: not seeded); unused when greedy.
    """

    temperature: float = 0.0
    top_p: float | None = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_p is None:
            object.__setattr__(self, "top_p", 1.0)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    @property
    def do_sample(self) -> bool:
        return not self.greedy

    def generate_kwargs(self, max_new_tokens: int | None = None, pad_token_id: int | None = None,
                        eos_token_id: int | None = None) -> dict[str, Any]:
        """The settings as keyword arguments of ``generate`` (``max_new_tokens`` may be lowered to fit a context).

        With stop strings, ``generate`` also needs ``tokenizer=`` to find them in the tokens.
        """
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens or self.max_new_tokens, "num_beams": 1,
                                  "use_cache": True}
        if self.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p), top_k=0)
        if self.stop:
            kwargs["stop_strings"] = list(self.stop)
        if pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
        if eos_token_id is not None:
            kwargs["eos_token_id"] = eos_token_id
        return kwargs

    def to_generation_config(self, tokenizer: Any = None, max_new_tokens: int | None = None):
        """A ``transformers.GenerationConfig`` with these settings (pad and eos ids from ``tokenizer`` if given)."""
        from transformers import GenerationConfig

        return GenerationConfig(**self.generate_kwargs(
            max_new_tokens,
            pad_token_id=getattr(tokenizer, "pad_token_id", None),
            eos_token_id=getattr(tokenizer, "eos_token_id", None),
        ))
