"""Command-line chat with Ferret about one image (the single-image inference script the original lacked).

One question::

    python -m ferret.serve.cli --model-path ./checkpoints/ferret-7b --image-file dog.jpg \\
        --query "What is <region0> doing?" --region box:10,20,200,240 --save-image answer.png

prints the answer as it is generated, then one line per grounded region of the answer, in pixels of the image::

    <phrase>\\t<type>\\t<coordinates>        e.g.  "the dog\\tbox\\t12,40,200,310"  or  "its nose\\tpoint\\t88,61"

``--region`` (repeatable; the K-th is ``<regionK>`` in the query) is ``box:x1,y1,x2,y2``, ``point:x,y`` or
``mask:file.png`` (non-zero pixels of a PNG the size of the image). ``--save-image`` writes the image with the
referring regions and the answer's grounded regions drawn and labelled.

Without ``--query`` it is an interactive multi-turn chat on the image: type questions; ``/box x1,y1,x2,y2`` and
``/point x,y`` add a region for the next question (refer to it as ``<region0>``, ``<region1>``, ...), ``/clear``
starts over, ``exit`` or end of input quits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image

from ferret import regions as R
from ferret.serve.draw import draw_regions, region_label
from ferret.serve.inference import PromptTooLong, SamplingParams, run_sync
from ferret.serve.protocol import (
    RequestError,
    add_region_feature_arguments,
    parse_region,
    resolve_region_feature,
)

logger = logging.getLogger(__name__)

HELP = (
    "Ask about the image; refer to regions as <region0>, <region1>, ... Commands:\n"
    "  /box x1,y1,x2,y2   add a box region (pixels) for the next question\n"
    "  /point x,y         add a point region for the next question\n"
    "  /clear             forget the conversation and pending regions\n"
    "  /help              this text\n"
    "  exit               quit (so does end of input)"
)


def _numbers(text: str, count: int, what: str) -> list[float]:
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} needs {count} numbers separated by commas, got {text!r}") from None
    if len(values) != count:
        raise ValueError(f"{what} needs {count} numbers separated by commas, got {text!r}")
    return values


def parse_region_spec(spec: str, image: Image.Image, index: int = 0) -> R.Region:
    """``box:x1,y1,x2,y2`` | ``point:x,y`` | ``mask:file.png`` -> a region validated against ``image``."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep:
        raise ValueError(f"region {spec!r} must look like box:x1,y1,x2,y2, point:x,y or mask:file.png")
    if kind in ("box", "point"):
        names = ("x1", "y1", "x2", "y2") if kind == "box" else ("x", "y")
        wire = {"type": kind, **dict(zip(names, _numbers(rest, len(names), kind), strict=True))}
        try:  # the servers' rules: a point on a pixel, box corners within the image
            return parse_region(wire, index, image.size).to_region(*image.size)
        except RequestError as err:
            raise ValueError(err.message) from err
    if kind == "mask":
        try:
            with Image.open(rest) as mask_image:
                mask = np.asarray(mask_image.convert("L")) > 0
        except OSError as err:
            raise ValueError(f"cannot read mask {rest!r}: {err}") from err
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {rest!r} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{image.width}x{image.height}")
        if not mask.any():
            raise ValueError(f"mask {rest!r} has no non-zero pixel")
        region = R.FreeForm(mask)
        R.validate_region(region, image.width, image.height)
        return region
    raise ValueError(f"region type {kind!r} in {spec!r}; expected box, point or mask")


def format_region(phrase: str, region: R.Region) -> str:
    """One output line: phrase, type and pixel coordinates, tab-separated."""
    phrase = phrase or "-"
    if isinstance(region, R.Box):
        return f"{phrase}\tbox\t{region.x1:g},{region.y1:g},{region.x2:g},{region.y2:g}"
    if isinstance(region, R.Point):
        return f"{phrase}\tpoint\t{region.x:g},{region.y:g}"
    box = region.bbox
    return f"{phrase}\tmask\t{box.x1:g},{box.y1:g},{box.x2:g},{box.y2:g}"


class ChatSession:
    """A conversation about one image: turns, regions per turn, and generation with streaming output."""

    def __init__(self, model: Any, processor: Any, image: Image.Image, params: SamplingParams,
                 out: TextIO = sys.stdout, save_image: str | None = None, region_feature: bool | None = None):
        self.model = model
        # None: as the checkpoint says (a model with a region sampler reads region features)
        self.region_feature = resolve_region_feature(region_feature, getattr(model, "config", None))
        self.processor = processor
        self.image = image
        self.params = params
        self.out = out
        self.save_image = save_image
        self.turns: list[dict[str, str]] = []
        self.regions: list[list[R.Region]] = []
        self.referred: list[tuple[str, R.Region]] = []

    def clear(self) -> None:
        self.turns, self.regions, self.referred = [], [], []

    def ask(self, question: str, regions: Sequence[R.Region] = (), prefix: str = "") -> tuple[str, list]:
        """Generate an answer to ``question`` (streamed to ``out``); print its grounded regions; remember the turn.

        Raises ValueError (e.g. a placeholder without a region, a context overflow); the turn is then forgotten.
        """
        for k in range(len(regions)):
            if f"<region{k}>" not in question:
                print(f"warning: region {k} is not referred to in the question (write <region{k}>)", file=sys.stderr)
        turns = self.turns + [{"from": "human", "value": question}]
        turn_regions = self.regions + [list(regions)]

        def prepare():
            return self.processor.encode(turns, self.image, regions=turn_regions, add_generation_prompt=True,
                                         truncate=False, region_feature=self.region_feature)

        self.out.write(prefix)
        self.out.flush()
        shown = ""
        final = None
        for step in run_sync(self.model, self.processor, prepare, self.params):
            if step.finished:
                final = step
                break
            if step.text.startswith(shown) and len(step.text) > len(shown):
                self.out.write(step.text[len(shown):])
                self.out.flush()
                shown = step.text
        if final is None or final.error is not None:
            self.out.write("\n")
            error = final.error if final is not None else RuntimeError("generation ended without an answer")
            raise error if isinstance(error, ValueError) else RuntimeError(f"generation failed: {error!r}")
        answer = final.text
        if answer.startswith(shown):
            self.out.write(answer[len(shown):])
        self.out.write("\n")
        _, grounded = self.processor.post_process(answer, self.image.size)
        for g in grounded:
            self.out.write(format_region(g.phrase, g.region) + "\n")
        self.out.flush()
        self.turns = turns + [{"from": "gpt", "value": answer}]
        self.regions = turn_regions + [[]]
        base = len(self.referred)
        self.referred += [(region_label(base + k), r) for k, r in enumerate(regions)]
        if self.save_image:
            items = list(self.referred) + [(g.phrase or f"obj{k}", g.region) for k, g in enumerate(grounded)]
            draw_regions(self.image, items).save(self.save_image)
            logger.info("saved %s", self.save_image)
        return answer, grounded


def interactive(session: ChatSession, stdin: TextIO = sys.stdin) -> None:
    """The multi-turn loop: questions and /commands from ``stdin`` until ``exit`` or end of input."""
    out = session.out
    out.write(f"Chat about the image ({session.image.width}x{session.image.height} px). /help for commands.\n")
    pending: list[R.Region] = []
    while True:
        out.write("USER: ")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.lower() in ("exit", "quit"):
            return
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            try:
                if command in ("/box", "/point"):
                    pending.append(parse_region_spec(command[1:] + ":" + rest, session.image, len(pending)))
                elif command == "/clear":
                    session.clear()
                    pending = []
                    out.write("conversation cleared\n")
                    continue
                elif command == "/help":
                    out.write(HELP + "\n")
                    continue
                else:
                    out.write(f"unknown command {command!r}; /help lists them\n")
                    continue
            except ValueError as err:
                out.write(f"error: {err}\n")
                continue
            _, kind, coords = format_region("", pending[-1]).split("\t")
            out.write(f"added <region{len(pending) - 1}>: {kind} {coords}\n")
            continue
        try:
            session.ask(line, pending, prefix="ASSISTANT: ")
        except PromptTooLong as err:
            out.write(f"error: {err}. /clear starts a new conversation.\n")
        except ValueError as err:
            out.write(f"error: {err}\n")
        pending = []


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with Ferret about one image.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--query", default=None, help="ask this and exit (default: interactive chat)")
    parser.add_argument("--region", action="append", default=[], metavar="SPEC",
                        help="box:x1,y1,x2,y2 | point:x,y | mask:file.png; the K-th is <regionK> in the query")
    parser.add_argument("--save-image", default=None, help="write the image with the regions drawn (PNG)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--keep-aspect-ratio", action="store_true", help="pad images to a square instead of stretching")
    add_region_feature_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--log-level", default="warning")
    return parser


def run(args: argparse.Namespace, model: Any, processor: Any, stdin: TextIO = sys.stdin,
        out: TextIO = sys.stdout) -> int:
    """The CLI with an already loaded model; returns the exit status."""
    try:
        with Image.open(args.image_file) as opened:
            image = opened.convert("RGB")
    except OSError as err:
        print(f"error: cannot read image {args.image_file}: {err}", file=sys.stderr)
        return 2
    try:
        regions = [parse_region_spec(spec, image, k) for k, spec in enumerate(args.region)]
        params = SamplingParams(args.temperature, args.top_p, args.max_new_tokens)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.keep_aspect_ratio:
        processor.image_aspect_ratio = "pad"
    session = ChatSession(model, processor, image, params, out=out, save_image=args.save_image,
                          region_feature=getattr(args, "region_feature", None))
    if args.query is None:
        if regions:
            print("warning: --region applies to --query; in the chat use /box and /point", file=sys.stderr)
        interactive(session, stdin)
        return 0
    try:
        session.ask(args.query, regions)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from ferret.model.builder import load_pretrained_model

    model, processor = load_pretrained_model(args.model_path, args.model_base, load_8bit=args.load_8bit,
                                             load_4bit=args.load_4bit, device=args.device)
    return run(args, model, processor)


if __name__ == "__main__":
    sys.exit(main())
