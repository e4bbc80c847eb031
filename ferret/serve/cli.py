"""Command-line chat with Ferret about one image (the single-image inference script the original lacked).

One question::

    ferret serve cli --model-path ./checkpoints/ferret-7b --image-file dog.jpg \\
        --query "What is <region0> doing?" --region box:10,20,200,240 --save-image answer.png

prints the answer as it is generated, then one line per grounded region of the answer, in pixels of the image::

    <phrase>\\t<type>\\t<coordinates>        e.g.  "the dog\\tbox\\t12,40,200,310"  or  "its nose\\tpoint\\t88,61"

``--region`` (repeatable; the K-th is ``<regionK>`` or ``[regionK]`` in the query), in pixels of the image:
``point:x,y``, ``box:x1,y1,x2,y2``, ``polygon:x1,y1,x2,y2,x3,y3,...`` (filled), ``scribble:x1,y1,x2,y2,...`` (a
stroke through the points, 5 px wide) or ``mask:file.png`` (non-zero pixels of a PNG the size of the image): the same
kinds as the web UI's Point / Box / Sketch and the API's ``regions``. ``--save-image`` writes the image, upscaled
when small, with the referring and grounded regions outlined and their labels in a legend under it.

Without ``--query`` it is an interactive multi-turn chat on the image: type questions; ``/box x1,y1,x2,y2``,
``/point x,y``, ``/polygon ...``, ``/scribble ...`` and ``/mask file.png`` add a region for the next question
(refer to it as ``<region0>``, ``<region1>``, ...), ``/clear`` starts over, ``exit`` or end of input quits.

Decoding is greedy by default (``--temperature 0``), so the same question gives the same answer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image

from ferret import regions as R
from ferret.serve.draw import draw_annotated, region_label
from ferret.flags import add_region_feature_argument
from ferret.serve.protocol import RequestError, parse_region, resolve_region_feature

# ferret.serve.inference (torch, transformers) is imported where a model runs, so that --help stays fast.

logger = logging.getLogger(__name__)

REGION_KINDS = ("point", "box", "polygon", "scribble", "mask")
SCRIBBLE_RADIUS = 2  # a scribble is a 5 px wide stroke

HELP = (
    "Ask about the image; refer to regions as <region0> (or [region0]), <region1>, ... Commands:\n"
    "  /box x1,y1,x2,y2          add a box region (pixels) for the next question\n"
    "  /point x,y                add a point region\n"
    "  /polygon x1,y1,x2,y2,...  add a filled polygon (3 or more vertices)\n"
    "  /scribble x1,y1,x2,y2,... add a stroke through the points\n"
    "  /mask file.png            add the non-zero pixels of a PNG the size of the image\n"
    "  /clear                    forget the conversation and pending regions\n"
    "  /help                     this text\n"
    "  exit                      quit (so does end of input)"
)


SYNTAX = ("point:x,y, box:x1,y1,x2,y2, polygon:x1,y1,x2,y2,x3,y3,..., scribble:x1,y1,x2,y2,... "
          "or mask:file.png")


def _numbers(text: str, what: str, count: int | None = None, pairs_at_least: int | None = None) -> list[float]:
    """Numbers separated by commas (or spaces): exactly ``count``, or an even number >= 2 * ``pairs_at_least``."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if count is not None:
        expected = f"{count} numbers separated by commas"
    else:
        expected = f"x,y pairs separated by commas (at least {pairs_at_least} points)"
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} needs {expected}, got {text!r}") from None
    if (count is not None and len(values) != count) or (
            pairs_at_least is not None and (len(values) % 2 or len(values) < 2 * pairs_at_least)):
        raise ValueError(f"{what} needs {expected}, got {text!r}")
    return values


def parse_region_spec(spec: str, image: Image.Image, index: int = 0) -> R.Region:
    """``point:x,y`` | ``box:x1,y1,x2,y2`` | ``polygon:x1,y1,...`` | ``scribble:x1,y1,...`` | ``mask:file.png``
    -> a region in pixels of ``image``, validated against it with the servers' rules."""
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    where = f"region {index} ({spec!r})"
    if not sep:
        raise ValueError(f"{where} must look like {SYNTAX}")
    if kind in ("box", "point"):
        names = ("x1", "y1", "x2", "y2") if kind == "box" else ("x", "y")
        wire = {"type": kind, **dict(zip(names, _numbers(rest, kind, count=len(names)), strict=True))}
        try:  # the servers' rules: a point on a pixel, box corners within the image
            return parse_region(wire, index, image.size).to_region(*image.size)
        except RequestError as err:
            raise ValueError(err.message) from err
    if kind in ("polygon", "scribble"):
        values = _numbers(rest, kind, pairs_at_least=3 if kind == "polygon" else 1)
        points = [[values[k], values[k + 1]] for k in range(0, len(values), 2)]
        if kind == "polygon":
            try:  # the API's polygon rules (every vertex inside the image)
                return parse_region({"type": "polygon", "points": points}, index, image.size).to_region(*image.size)
            except RequestError as err:
                raise ValueError(err.message) from err
        for k, (x, y) in enumerate(points):
            if not (0 <= x <= image.width - 1 and 0 <= y <= image.height - 1):
                raise ValueError(f"region {index} (scribble) point {k} ({x:g}, {y:g}) is outside the "
                                 f"{image.width}x{image.height} image")
        return R.FreeForm.from_scribble([tuple(p) for p in points], image.width, image.height,
                                        radius=SCRIBBLE_RADIUS)
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
    raise ValueError(f"{where}: unknown region type {kind!r}; expected {SYNTAX}")


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

    def __init__(self, model: Any, processor: Any, image: Image.Image, params: Any,
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

        ``[regionK]`` in the question is read as ``<regionK>``. Raises ValueError (e.g. a placeholder without a
        region, a context overflow); the turn is then forgotten.
        """
        from ferret.serve.inference import run_sync

        question = R.typed_to_placeholders(question)  # `[regionK]` (the web UI's way) reads as `<regionK>`
        for k in range(len(regions)):
            if R.placeholder(k) not in question:
                print(f"warning: region {k} is not referred to in the question (write {R.placeholder(k)})",
                      file=sys.stderr)
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
            draw_annotated(self.image, items).save(self.save_image)
            logger.info("saved %s", self.save_image)
        return answer, grounded


def interactive(session: ChatSession, stdin: TextIO = sys.stdin) -> None:
    """The multi-turn loop: questions and /commands from ``stdin`` until ``exit`` or end of input."""
    from ferret.serve.inference import PromptTooLong

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
                if command[1:] in REGION_KINDS:
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
    parser.add_argument("--model-path", required=True,
                        help="a checkpoint folder (config.json + weights), or a hub id such as org/name")
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--query", default=None, help="ask this and exit (default: interactive chat)")
    parser.add_argument("--region", action="append", default=[], metavar="SPEC",
                        help="point:x,y | box:x1,y1,x2,y2 | polygon:x1,y1,x2,y2,x3,y3,... | scribble:x1,y1,... | "
                             "mask:file.png, in pixels of the image; the K-th is <regionK> in the query")
    parser.add_argument("--save-image", default=None,
                        help="write the image (upscaled when small) with the regions outlined and labelled (PNG)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--keep-aspect-ratio", action="store_true", help="pad images to a square instead of stretching")
    add_region_feature_argument(parser, default=None)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--log-level", default="warning")
    return parser


def run(args: argparse.Namespace, model: Any, processor: Any, stdin: TextIO = sys.stdin,
        out: TextIO = sys.stdout) -> int:
    """The CLI with an already loaded model (``--keep-aspect-ratio`` is a loading setting: main passes it to
    ``load_pretrained_model``); returns the exit status."""
    try:
        with Image.open(args.image_file) as opened:
            image = opened.convert("RGB")
    except OSError as err:
        print(f"error: cannot read image {args.image_file}: {err}", file=sys.stderr)
        return 2
    from ferret.decoding import DecodingSettings

    try:
        regions = [parse_region_spec(spec, image, k) for k, spec in enumerate(args.region)]
        params = DecodingSettings(args.temperature, args.top_p, args.max_new_tokens)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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


def model_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a model (one line), or None. A local path must be a folder with ``config.json``; a
    name like ``org/name`` that is not a local path is left to the hub."""
    # A hub id is org/name; a path whose first part is a local folder (runs/x) is a local path.
    looks_local = (path.startswith((".", "/", "~")) or path.count("/") != 1
                   or os.path.isdir(path.split("/", 1)[0]))
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            return f"--model-path {path}: the folder has no config.json (expected a Ferret checkpoint folder)"
        return None
    if os.path.exists(expanded):
        return f"--model-path {path}: not a folder (expected a Ferret checkpoint folder with config.json)"
    if looks_local:
        return (f"--model-path {path}: no such folder (expected a Ferret checkpoint folder with config.json, "
                "or a hub id such as org/name)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return (f"--model-path {path}: no such folder, and HF_HUB_OFFLINE is set, so it is not looked up on the "
                "hub (expected a Ferret checkpoint folder with config.json)")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    problem = model_path_problem(args.model_path)
    if problem is None and not os.path.isfile(args.image_file):
        problem = f"--image-file {args.image_file}: no such file"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import transformers

    from ferret.model.builder import load_pretrained_model

    transformers.utils.logging.disable_progress_bar()  # no weight-loading bar in a chat
    try:
        model, processor = load_pretrained_model(args.model_path, args.model_base, load_8bit=args.load_8bit,
                                                 load_4bit=args.load_4bit, device=args.device,
                                                 image_aspect_ratio="pad" if args.keep_aspect_ratio else None)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: cannot load the model from {args.model_path}: {first}", file=sys.stderr)
        return 2
    return run(args, model, processor)


if __name__ == "__main__":
    sys.exit(main())
