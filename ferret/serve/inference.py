"""Streaming generation for Ferret's servers: a concurrency limiter and one generation running in its own thread.

The model worker, the OpenAI-compatible API and the CLI share this module:

* ``ConcurrencyLimiter`` hands out at most ``limit`` ``Slot``s and refuses the next request at once (no queue, no
  waiting): a server answers "busy" instead of hanging. A slot is released exactly once, by whoever owns it last.
* ``Generation`` runs ``prepare()`` (request validation, image decoding, tokenisation: all CPU work off the event
  loop) and then ``model.generate`` in a daemon thread. It reports ``Step``s through a sink callable: a first
  ``ready`` step (the prompt is valid, ``prompt_tokens`` known), one step per generated token with the decoded
  output so far, and one final step (``finished``) carrying the finish reason or the error. The thread owns the slot
  and releases it *before* the final step is reported, so a client that has read the last message sees the slot
  free. ``cancel()`` (client gone) stops generation at the next token.
* ``SamplingParams`` turns the request's temperature / top_p / max_new_tokens / stop into ``generate`` arguments
  the way the original worker meant them: temperature <= 1e-4 is greedy, otherwise plain multinomial sampling from
  softmax(logits / T) with nucleus ``top_p`` (the original read it but ignored it: docs/compatibility.md §12.36), no
  top-k.

Nothing here truncates a prompt: one that leaves no room to generate is refused (``PromptTooLong``), so the
``<image>`` positions can never be cut (docs/compatibility.md §12.36).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

GREEDY_TEMPERATURE = 1e-4  # at or below: argmax, as the original worker


class PromptTooLong(ValueError):
    """The prompt leaves no room for a single new token in the model's context."""


# ---------------------------------------------------------------------------------------------- concurrency


class Slot:
    """One unit of a ``ConcurrencyLimiter``; ``release()`` is idempotent and thread-safe."""

    def __init__(self, limiter: ConcurrencyLimiter):
        self._limiter = limiter
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._limiter._give_back()


class ConcurrencyLimiter:
    """At most ``limit`` requests in flight; ``try_acquire`` never waits."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the concurrency limit must be >= 1, got {limit}")
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def try_acquire(self) -> Slot | None:
        """A slot, or None when ``limit`` slots are already out."""
        with self._lock:
            if self._in_flight >= self.limit:
                return None
            self._in_flight += 1
        return Slot(self)

    def _give_back(self) -> None:
        with self._lock:
            if self._in_flight <= 0:  # pragma: no cover - Slot.release guards against double release
                raise RuntimeError("released more slots than were acquired")
            self._in_flight -= 1


# ---------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (defaults: the original web UI's)."""

    temperature: float = 0.2
    top_p: float = 0.7
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def do_sample(self) -> bool:
        return self.temperature > GREEDY_TEMPERATURE

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False}
        kwargs: dict[str, Any] = {"do_sample": True, "temperature": self.temperature, "top_k": 0}
        if self.top_p < 1:
            kwargs["top_p"] = self.top_p
        return kwargs


# ---------------------------------------------------------------------------------------------- steps


@dataclass
class Step:
    """What a running generation reports.

    ``text`` is the decoded output so far: cut before a stop string and, in an intermediate step, before the first
    character that is still an incomplete UTF-8 sequence, so each intermediate text is a prefix of the next. The
    first step has ``ready=True`` and ``prompt_tokens`` set; the last has ``finished=True`` and ``finish_reason``
    "stop" (eos or a stop string), "length", "cancelled" or "error" (then ``error`` holds the exception).
    """

    text: str = ""
    num_tokens: int = 0
    ready: bool = False
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    error: BaseException | None = None
    info: dict[str, Any] = field(default_factory=dict)


def stable_prefix(text: str, stops: Sequence[str]) -> str:
    """``text`` without a trailing part that could still grow into one of ``stops`` (for incremental deltas)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold] if hold else text


class _Cancelled(StoppingCriteria):
    def __init__(self, flag: Callable[[], bool]):
        self._flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self._flag(), dtype=torch.bool, device=input_ids.device)


class _StepStreamer(BaseStreamer):
    """Receives token ids from ``generate`` (the first ``put`` is the prompt and is skipped)."""

    def __init__(self, generation: Generation):
        self._generation = generation
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self._generation._on_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- generation


class Generation:
    """One request's generation in a daemon thread; see the module docstring for the protocol.

    Args:
        model / processor: the loaded Ferret model (eval mode) and its FerretProcessor.
        prepare: returns the encoded sample (dict with ``input_ids`` [L], ``images``, ``region_masks``), or
            ``(sample, params)`` when the request itself carries the decoding settings; any exception it raises
            ends the generation with an error step (the server maps it to a 4xx).
        params: decoding settings (unless ``prepare`` returns them); ``max_new_tokens`` is lowered to fit.
        sink: called from the generation thread with each ``Step``; must not block for long.
        slot: released when the thread is done (before the final step is reported).
        context_length: the model's context (default: ``processor.model_max_length``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        prepare: Callable[[], Any],
        params: SamplingParams,
        sink: Callable[[Step], None],
        slot: Slot | None = None,
        context_length: int | None = None,
    ):
        self.model = model
        self.processor = processor
        self.prepare = prepare
        self.params = params
        self.sink = sink
        self.slot = slot
        self.context_length = context_length or processor.model_max_length
        self.features: dict[str, Any] | None = None
        self._cancel = threading.Event()
        self._stopped = False  # a stop string was generated
        self._ids: list[int] = []
        self._text = ""
        self.thread = threading.Thread(target=self._run, name="ferret-generate", daemon=True)

    # -------------------------------------------------------------- control
    def start(self) -> Generation:
        self.thread.start()
        return self

    def cancel(self) -> None:
        """Stop at the next token (e.g. the client went away). Safe to call at any time, from any thread."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -------------------------------------------------------------- thread
    def _emit(self, step: Step) -> None:
        try:
            self.sink(step)
        except Exception:  # a consumer that is gone must not kill generation bookkeeping
            logger.debug("step sink failed; cancelling generation", exc_info=True)
            self._cancel.set()

    def _run(self) -> None:
        final: Step
        try:
            final = self._generate()
        except BaseException as err:  # noqa: BLE001 - reported to the consumer, never lost
            if isinstance(err, ValueError):  # a refused request (the server answers 4xx)
                logger.debug("request refused: %s", err)
            else:
                logger.exception("generation failed")
            final = Step(text=self._text, num_tokens=len(self._ids), finished=True, finish_reason="error", error=err)
        finally:
            if self.slot is not None:
                self.slot.release()
        self._emit(final)

    def _generate(self) -> Step:
        features = self.prepare()
        if isinstance(features, tuple):
            features, self.params = features
        self.features = features
        prompt_tokens = int(features["input_ids"].numel())
        room = self.context_length - prompt_tokens
        if room < 1:
            raise PromptTooLong(
                f"the prompt is {prompt_tokens} tokens (image positions included); the model's context is "
                f"{self.context_length}, which leaves no room to generate"
            )
        max_new_tokens = min(self.params.max_new_tokens, room)
        self._emit(Step(ready=True, prompt_tokens=prompt_tokens, info={"max_new_tokens": max_new_tokens}))
        if self._cancel.is_set():
            return Step(finished=True, finish_reason="cancelled", prompt_tokens=prompt_tokens)

        tokenizer = self.processor.tokenizer
        inputs = self.processor.model_inputs(features, self.model)
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                streamer=_StepStreamer(self),
                stopping_criteria=StoppingCriteriaList([_Cancelled(lambda: self._cancel.is_set() or self._stopped)]),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **self.params.generate_kwargs(),
            )
        if self._stopped:
            reason = "stop"
        elif self._ids and self._ids[-1] == tokenizer.eos_token_id:
            reason = "stop"
        elif self._cancel.is_set():
            reason = "cancelled"
        else:
            reason = "length"
        text = self._decode(final=True)
        return Step(text=text, num_tokens=len(self._ids), finished=True, finish_reason=reason,
                    prompt_tokens=prompt_tokens)

    def _decode(self, final: bool) -> str:
        text = self.processor.tokenizer.decode(self._ids, skip_special_tokens=True)
        for stop in self.params.stop:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                self._stopped = True
        if not final:
            # An incomplete UTF-8 sequence decodes to U+FFFD until its other bytes arrive, and then changes: report
            # only the part before it, so that every intermediate text is a prefix of the next.
            cut = text.find("\ufffd")
            if cut >= 0:
                text = text[:cut]
        return text

    def _on_tokens(self, ids: list[int]) -> None:
        if self._stopped:
            return  # the step after a stop string is never shown
        self._ids.extend(ids)
        self._text = self._decode(final=False)
        self._emit(Step(text=self._text, num_tokens=len(self._ids)))


# ---------------------------------------------------------------------------------------------- consumers


def run_sync(
    model: torch.nn.Module,
    processor: Any,
    prepare: Callable[[], dict[str, Any]],
    params: SamplingParams,
    slot: Slot | None = None,
    timeout: float | None = None,
) -> Iterator[Step]:
    """Run a generation and iterate its steps in the calling thread (CLI, tests). Cancels it if abandoned."""
    steps: queue.Queue[Step] = queue.Queue()
    generation = Generation(model, processor, prepare, params, steps.put, slot=slot).start()
    try:
        while True:
            step = steps.get(timeout=timeout)
            yield step
            if step.finished:
                return
    finally:
        generation.cancel()


class AsyncSteps:
    """Bridges a ``Generation``'s thread to an asyncio consumer without using a thread pool.

    Create it inside the event loop; pass ``self.put`` as the sink; ``await self.get()`` the steps.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Step] = asyncio.Queue()

    def put(self, step: Step) -> None:  # called from the generation thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, step)

    async def get(self) -> Step:
        return await self._queue.get()


async def start_streaming(
    model: torch.nn.Module,
    processor: Any,
    prepare: Callable[[], Any],
    params: SamplingParams,
    slot: Slot | None = None,
) -> tuple[Generation, AsyncSteps, Step]:
    """Start a generation for an asyncio server and await its first step: ``ready``, or the error that ended it.

    Returns (generation, its steps, the first step). The slot is released if the thread never starts, and the
    generation is cancelled if the caller is cancelled while waiting.
    """
    steps = AsyncSteps()
    generation = Generation(model, processor, prepare, params, steps.put, slot=slot)
    try:
        generation.start()
    except BaseException:  # the thread never ran, so it cannot release the slot
        if slot is not None:
            slot.release()
        raise
    try:
        first = await steps.get()
    except BaseException:
        generation.cancel()
        raise
    return generation, steps, first
