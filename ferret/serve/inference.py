"""Streaming generation for Ferret's servers: a concurrency limiter and one generation running in its own thread.

The model worker, the OpenAI-compatible API and the CLI share this module:

* ``ConcurrencyLimiter`` hands out at most ``limit`` ``Slot``s and refuses the next request at once (no queue, no
  waiting): a server answers "busy" instead of hanging. A slot is released exactly once, by whoever owns it last.
* ``Generation`` runs ``prepare()`` (request validation, image decoding, tokenisation: all CPU work off the event
  loop) and then ``model.generate`` in a daemon thread. It reports ``Step``s through a sink callable: a first
  ``ready`` step (the prompt is valid, ``prompt_tokens`` known), one step per generated token with the decoded
  output so far (decoded incrementally by ``TextDeltaStreamer``), and one final step (``finished``) carrying the
  finish reason or the error. The thread owns the slot and releases it *before* the final step is reported, so a
  client that has read the last message sees the slot free. ``cancel()`` (client gone) stops generation at the next
  token.
* The decoding settings are ``ferret.decoding.DecodingSettings`` (``SamplingParams`` here: the same type with the
  original web UI's defaults): temperature <= 1e-4 is greedy, otherwise plain multinomial sampling from
  softmax(logits / T) with nucleus ``top_p`` (which the original read but ignored: docs/compatibility.md §12.36) and
  no top-k. Stop strings end generation through ``generate``'s ``stop_strings``; the answer is cut before them.

Nothing here truncates a prompt: one that leaves no room to generate is refused (``PromptTooLong``, which is the
processor's ``PromptTooLongError``), so the ``<image>`` positions can never be cut (docs/compatibility.md §12.36).
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

from ferret.decoding import GREEDY_TEMPERATURE, DecodingSettings  # noqa: F401 - GREEDY_TEMPERATURE re-exported
from ferret.processing import PromptTooLongError

logger = logging.getLogger(__name__)

# The prompt leaves no room for a single new token in the model's context (the processor's error, one class).
PromptTooLong = PromptTooLongError


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
class SamplingParams(DecodingSettings):
    """``DecodingSettings`` with the original web UI's defaults (temperature 0.2, top_p 0.7, 512 new tokens); the
    name this module used before the settings type was shared."""

    temperature: float = 0.2
    top_p: float | None = 0.7


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


class TextDeltaStreamer(BaseStreamer):
    """A ``generate`` streamer that turns the new tokens into text as they arrive, without decoding the whole output
    again at each token.

    Each token is decoded together with the few tokens before it (so SentencePiece's word-initial spaces come out as
    in a decode of the whole answer) and only the characters it adds are appended to ``text``; a token that ends in
    an incomplete UTF-8 sequence (U+FFFD) waits for the bytes that complete it. ``text`` therefore only grows, and
    each value is a prefix of the next. The first ``put`` (the prompt) is skipped. ``on_token(ids, text)`` is called
    after each ``put`` with the ids received so far.
    """

    def __init__(self, tokenizer: Any, on_token: Callable[[list[int], str], None]):
        self.tokenizer = tokenizer
        self.on_token = on_token
        self.ids: list[int] = []
        self.text = ""
        self._context_start = 0  # first id of the decoding window
        self._read = 0  # ids [0, _read) are in ``text``
        self._seen_prompt = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        before = self._decode(self.ids[self._context_start:self._read])
        after = self._decode(self.ids[self._context_start:])
        if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._context_start, self._read = self._read, len(self.ids)
        self.on_token(self.ids, self.text)

    def end(self) -> None:
        pass


def cut_at_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[str, bool]:
    """(``text`` cut before the first stop string that begins at or after ``start``, whether one was found)."""
    ends = [at for at in (text.find(stop, start) for stop in stops) if at >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


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
        params: DecodingSettings,
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
        self._longest_stop = 0
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
        self._longest_stop = max((len(stop) for stop in self.params.stop), default=0)
        kwargs = self.params.generate_kwargs(max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                             eos_token_id=tokenizer.eos_token_id)
        if self.params.stop:
            kwargs["tokenizer"] = tokenizer  # generate finds stop_strings in the tokens through it
        if self.params.seed is not None and self.params.do_sample:
            torch.manual_seed(self.params.seed)
        with torch.inference_mode():
            # The streamer turns tokens into text; generation ends at eos, at a stop string, at max_new_tokens,
            # or when cancelled (also when the streamer saw a stop string that generate's own check did not).
            self.model.generate(
                **inputs,
                streamer=TextDeltaStreamer(tokenizer, self._on_token),
                stopping_criteria=StoppingCriteriaList([_Cancelled(lambda: self._cancel.is_set() or self._stopped)]),
                **kwargs,
            )
        # The answer: the generated ids decoded once, cut before the first stop string.
        text, stopped = cut_at_stop(tokenizer.decode(self._ids, skip_special_tokens=True), self.params.stop)
        if stopped or self._stopped:
            reason = "stop"
        elif self._ids and self._ids[-1] == tokenizer.eos_token_id:
            reason = "stop"
        elif self._cancel.is_set():
            reason = "cancelled"
        else:
            reason = "length"
        return Step(text=text, num_tokens=len(self._ids), finished=True, finish_reason=reason,
                    prompt_tokens=prompt_tokens)

    def _on_token(self, ids: list[int], text: str) -> None:
        """Called by the streamer after each new token with the ids and text so far."""
        if self._stopped:
            return  # the step after a stop string is never shown
        self._ids = list(ids)
        if self.params.stop:
            # Only the end of the text can hold a stop string that was not there at the previous token.
            start = max(0, len(self._text) - self._longest_stop + 1)
            text, self._stopped = cut_at_stop(text, self.params.stop, start)
        self._text = text
        self._emit(Step(text=self._text, num_tokens=len(self._ids)))


# ---------------------------------------------------------------------------------------------- consumers


def run_sync(
    model: torch.nn.Module,
    processor: Any,
    prepare: Callable[[], dict[str, Any]],
    params: DecodingSettings,
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
    params: DecodingSettings,
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
