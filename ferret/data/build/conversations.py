"""``ferret data generate-conversations``: GPT-style refer-and-ground dialogues from annotations, through any
OpenAI-compatible chat endpoint, converted to GRIT ``git_instruction`` records.

    ferret data generate-conversations --out convs --vg-dir data/vg --vg-images data/vg/images \\
        --endpoint https://api.openai.com/v1 --model gpt-4o --max-images 1000

For every usable image (evaluation images left out as in ``ferret data build``) the annotations are rendered
into a prompt (ferret/data/build/prompts.py documents it), sent with bounded retries (``--max-retries``, with
back-off, for network errors, 429 and 5xx; ``--workers`` requests in parallel), and the raw reply is appended to
``OUT/responses.jsonl`` at once.
A second run skips every image already answered there, so an interrupted run resumes where it stopped. Then all
replies are parsed (``parse_reply``): good ones become records in ``OUT/data/git_instruction_generated_*.json``
(checked with the loaders' own ``check_record``), the others are kept aside in ``OUT/unparseable.jsonl`` with
the reason, and counted in ``OUT/generate_report.json``/``.txt``. The mix for training is written beside them as
for ``ferret data build``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ferret.constants import IMAGE_TOKEN, REGION_TOKEN
from ferret.data.build.common import BuildError, ImageRef, box_from_xywh
from ferret.data.build.context import BuildContext
from ferret.data.build.prompts import SYSTEM_PROMPT, render_context

logger = logging.getLogger("ferret.data.build.conversations")

MAX_OBJECTS = 40
MAX_RELATIONS = 20
MAX_REGIONS = 15
TAG = "git_instruction"
TURN_PREFIXES = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt"}


@dataclass
class Context:
    """The annotations of one image as the prompt shows them."""

    key: str
    image: ImageRef
    objects: list[tuple[str, tuple]] = field(default_factory=list)  # (name, pixel box)
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    regions: list[tuple[str, tuple]] = field(default_factory=list)  # (description, pixel box)

    def boxes_by_text(self) -> dict[str, tuple]:
        """Box text on the grid -> the annotated pixel box (the first one when two round alike)."""
        from ferret.regions import Box, region_to_text

        table: dict[str, tuple] = {}
        for _, box in self.objects + self.regions:
            table.setdefault(region_to_text(Box(*box), self.image.width, self.image.height), box)
        return table

    def prompt(self) -> str:
        from ferret.regions import Box, region_to_text

        w, h = self.image.width, self.image.height
        return render_context([(n, region_to_text(Box(*b), w, h)) for n, b in self.objects], self.relations,
                              [(t, region_to_text(Box(*b), w, h)) for t, b in self.regions])


# ------------------------------------------------------------------------------------------------ contexts
def vg_contexts(ctx: BuildContext, vg_dir: str, image_folder: str) -> Iterator[Context]:
    """Objects, relationships and region descriptions of each VG image, joined by image id through buckets."""
    from ferret.data.build import vg
    from ferret.data.build.streaming import Buckets, bucket_count, iter_items
    from ferret.data.build.tasks import clean_name

    paths = {k: os.path.join(vg_dir, v) for k, v in vg.FILES.items()}
    if not os.path.isfile(paths["image_data"]) or not os.path.isfile(paths["objects"]):
        raise BuildError(f"{vg_dir}: needs image_data.json and objects.json")
    images = vg.VGImages(paths["image_data"], ctx.show_progress)
    source = ctx.report.source("vg", label="generated_vg")
    size = sum(os.path.getsize(p) for k, p in paths.items() if k != "image_data" and os.path.isfile(p))
    buckets = Buckets(os.path.join(ctx.tmp_dir, "conversations_vg"), bucket_count(size))
    try:
        for name, field_name in (("objects", "objects"), ("relationships", "relationships"), ("regions", "regions")):
            if not os.path.isfile(paths[name]):
                continue
            for entry in iter_items(paths[name], "item", f"VG {name}", ctx.show_progress):
                image_id = entry.get("image_id", entry.get("id"))
                items = entry.get(field_name)
                if isinstance(image_id, int) and images.get(image_id) is not None and isinstance(items, list):
                    buckets.add(image_id, name, items)
        for image_id, group in buckets.groups():
            rel, width, height, coco_id, flickr_id = images.get(image_id)
            ref = ImageRef(rel, width, height)
            reason = None if ctx.keep_eval_images else ctx.eval_images.vg_reason(coco_id, flickr_id)
            if not ctx.accept_image(source, image_folder, ref, eval_reason=reason):
                continue
            context = Context(f"vg/{image_id}", ref)
            index: dict[int, int] = {}
            for obj in sum(group.get("objects", []), []):
                named = vg._object(obj, width, height)
                if named is not None and len(context.objects) < MAX_OBJECTS:
                    index[obj.get("object_id")] = len(context.objects)
                    context.objects.append((named.name, named.target.box))
            for rel_ in sum(group.get("relationships", []), []):
                if not isinstance(rel_, dict) or not isinstance(rel_.get("subject"), dict) \
                        or not isinstance(rel_.get("object"), dict):
                    continue
                s = index.get(rel_["subject"].get("object_id"))
                o = index.get(rel_["object"].get("object_id"))
                if s is not None and o is not None and len(context.relations) < MAX_RELATIONS:
                    context.relations.append((s, clean_name(rel_.get("predicate") or "") or "with", o))
            for region in sum(group.get("regions", []), []):
                if not isinstance(region, dict):
                    continue
                box = box_from_xywh(region.get("x"), region.get("y"), region.get("width"), region.get("height"),
                                    width, height)
                phrase = " ".join(str(region.get("phrase") or "").split())
                if box is not None and phrase and len(context.regions) < MAX_REGIONS:
                    context.regions.append((phrase, box))
            if context.objects:
                source.images_used += 1
                yield context
    finally:
        buckets.close()


def coco_contexts(ctx: BuildContext, path: str, image_folder: str) -> Iterator[Context]:
    from ferret.data.build import coco

    cats = coco.category_names(coco.categories(path, ctx.show_progress))
    source = ctx.report.source("coco", label="generated_coco")
    for image, anns in coco.grouped(ctx, path, "conversations_coco", source):
        ref = coco.image_ref(image)
        if ref is None or not ctx.accept_image(source, image_folder, ref, coco_id=image["id"]):
            continue
        context = Context(f"coco/{image['id']}", ref)
        for ann in anns:
            category = ann.get("category_id")
            name = cats.get(category, (None,))[0] if isinstance(category, int) else None
            box = box_from_xywh(*ann["bbox"][:4], ref.width, ref.height) \
                if isinstance(ann.get("bbox"), list) and len(ann["bbox"]) >= 4 else None
            if name and box is not None and len(context.objects) < MAX_OBJECTS:
                context.objects.append((name, box))
        if context.objects:
            source.images_used += 1
            yield context


# ------------------------------------------------------------------------------------------------ the endpoint
class RequestFailed(RuntimeError):
    pass


def chat(endpoint: str, model: str, system: str, user: str, api_key: str | None, timeout: float,
         max_retries: int, retry_wait: float, temperature: float) -> tuple[str, int]:
    """The reply text of one chat completion and the number of attempts; RequestFailed after the retries."""
    url = endpoint.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "temperature": temperature,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last = ""
    for attempt in range(1, max_retries + 2):
        try:
            request = urllib.request.Request(url, data=body.encode("utf-8"), headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
            content = payload["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise RequestFailed(f"{url}: the reply has no text content")
            return content, attempt
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
            if err.code != 429 and err.code < 500:
                raise RequestFailed(f"{url}: {last} {err.read()[:200]!r}") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            last = f"{type(err).__name__}: {err}"
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise RequestFailed(f"{url}: not an OpenAI-style chat completion ({err})") from err
        if attempt <= max_retries:
            time.sleep(retry_wait * 2 ** (attempt - 1))
    raise RequestFailed(f"{url}: gave up after {max_retries + 1} attempts ({last})")


# ------------------------------------------------------------------------------------------------ replies
class Unparseable(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def split_turns(reply: str) -> list[dict]:
    """``User:`` / ``Assistant:`` lines -> turns ({from, value}); lines without a prefix continue a turn."""
    turns: list[dict] = []
    for raw in reply.strip().splitlines():
        line = raw.strip().lstrip("*#- ").replace("**", "")
        head, sep, rest = line.partition(":")
        role = TURN_PREFIXES.get(head.strip().lower()) if sep else None
        if role is not None:
            turns.append({"from": role, "value": rest.strip()})
        elif line and turns:
            turns[-1]["value"] = (turns[-1]["value"] + " " + line).strip()
        elif line:
            raise Unparseable("text_before_first_turn", f"text before the first 'User:' line: {line[:60]!r}")
    return turns


def parse_reply(reply: str, context: dict) -> dict:
    """A reply -> a GRIT record, or Unparseable naming the reason. ``context``: the line of responses.jsonl."""
    from ferret.data.grit import DATASET_TYPES, check_record
    from ferret.regions import grit_placeholder, parse_regions

    width, height = context["image_w"], context["image_h"]
    table = {text: tuple(box) for text, box in context["boxes"].items()}
    turns = split_turns(reply)
    if len(turns) < 2:
        raise Unparseable("no_turns", "the reply has no User/Assistant exchange")
    for t, turn in enumerate(turns):
        if turn["from"] != ("human", "gpt")[t % 2]:
            raise Unparseable("turn_order", f"turn {t} is {turn['from']}; turns must alternate, User first")
        if not turn["value"]:
            raise Unparseable("empty_turn", f"turn {t} is empty")
        if IMAGE_TOKEN in turn["value"] or REGION_TOKEN in turn["value"] or "<bbox_location" in turn["value"]:
            raise Unparseable("special_token", f"turn {t} contains a special token")
    if len(turns) % 2:
        raise Unparseable("unanswered_turn", "the reply ends with a User turn")
    boxes = []
    for t, turn in enumerate(turns):
        text, pieces, cursor, turn_boxes = turn["value"], [], 0, []
        for found in parse_regions(text, width, height):
            if len(found.grid) != 4:
                raise Unparseable("point_in_reply", f"turn {t} writes a point {list(found.grid)}; only listed "
                                  "boxes may be used")
            key = "[{}, {}, {}, {}]".format(*found.grid)
            if key not in table:
                raise Unparseable("unknown_region", f"turn {t} writes {key}, which is not an annotated box")
            pieces += [text[cursor:found.span[0]], grit_placeholder(len(turn_boxes))]
            turn_boxes.append(list(table[key]))
            cursor = found.span[1]
        pieces.append(text[cursor:])
        turn["value"] = "".join(pieces)
        boxes.append(turn_boxes)
    if not any(boxes):
        raise Unparseable("ungrounded", "the reply refers to and grounds no region")
    turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
    record = {"id": f"{TAG}/{context['key']}", "image": context["image"], "image_w": width, "image_h": height,
              "conversations": turns, "box_x1y1x2y2": boxes}
    problems = check_record(record, DATASET_TYPES[TAG]).errors
    if problems:
        raise Unparseable("failed_check", "; ".join(f"[{p.reason}] {p.message}" for p in problems))
    return record


def read_responses(path: str) -> list[dict]:
    """The answered images so far; a line cut short by a killed run is ignored (that image is asked again)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s: ignoring an incomplete line (the image will be asked again)", path)
    return out


# ------------------------------------------------------------------------------------------------ command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferret data generate-conversations", description=(
        "Refer-and-ground conversations generated from annotations by any OpenAI-compatible chat endpoint, "
        "converted to GRIT records (git_instruction). Resumable: rerun the same command to continue."))
    p.add_argument("--out", help="output folder (responses.jsonl, data/, unparseable.jsonl, report); required")
    p.add_argument("--vg-dir", help="Visual Genome folder (objects, relationships, region descriptions)")
    p.add_argument("--vg-images")
    p.add_argument("--coco-instances", help="COCO instances file (objects only)")
    p.add_argument("--coco-images")
    p.add_argument("--exclude-eval", nargs="+", default=[],
                   help="evaluation annotation files whose images are left out (as for ferret data build)")
    p.add_argument("--keep-eval-images", action="store_true")
    p.add_argument("--endpoint", default="https://api.openai.com/v1", help="base URL of the OpenAI-compatible API")
    p.add_argument("--model", default="gpt-4o")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key "
                   "(none is sent when it is unset)")
    p.add_argument("--prompt-file", help="replace the system prompt (default: ferret/data/build/prompts.py)")
    p.add_argument("--print-prompt", action="store_true", help="print the system prompt and exit")
    p.add_argument("--max-images", type=int, default=100, help="images to ask about (0: all)")
    p.add_argument("--workers", type=int, default=4, help="requests in parallel")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=3, help="retries per image (network errors, 429, 5xx)")
    p.add_argument("--retry-wait", type=float, default=2.0, help="first back-off in seconds (doubles)")
    p.add_argument("--max-failures", type=int, default=20, help="stop after this many images failed to answer")
    p.add_argument("--shard-size", type=int, default=20000)
    p.add_argument("--skip-image-check", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> dict:
    from ferret.data.build.streaming import progress
    from ferret.data.build.writer import RECIPE_WEIGHTS, ShardWriter, write_mix

    system = SYSTEM_PROMPT
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            system = f.read()
    if not args.vg_dir and not args.coco_instances:
        raise BuildError("pass --vg-dir or --coco-instances")
    if args.workers < 1 or args.max_retries < 0:
        raise BuildError("--workers must be >= 1 and --max-retries >= 0")
    os.makedirs(args.out, exist_ok=True)
    ctx = BuildContext(os.path.join(args.out, ".work"), check_images=not args.skip_image_check,
                       show_progress=not args.no_progress, keep_eval_images=args.keep_eval_images)
    for path in args.exclude_eval:
        ctx.eval_images.add_file(path)
    responses_path = os.path.join(args.out, "responses.jsonl")
    done = {r["key"] for r in read_responses(responses_path)}
    counts: Counter = Counter()
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None

    contexts: list[Iterator[Context]] = []
    if args.vg_dir:
        if not args.vg_images:
            raise BuildError("--vg-images is required with --vg-dir")
        contexts.append(vg_contexts(ctx, args.vg_dir, args.vg_images))
    if args.coco_instances:
        if not args.coco_images:
            raise BuildError("--coco-images is required with --coco-instances")
        contexts.append(coco_contexts(ctx, args.coco_instances, args.coco_images))
    folders = {"vg": args.vg_images, "coco": args.coco_images}

    def ask(context: Context) -> tuple[Context, str, int]:
        reply, attempts = chat(args.endpoint, args.model, system, context.prompt(), api_key, args.timeout,
                               args.max_retries, args.retry_wait, args.temperature)
        return context, reply, attempts

    def todo() -> Iterator[Context]:
        asked = 0
        for stream in contexts:
            for context in stream:
                if args.max_images and asked >= args.max_images:
                    return
                asked += 1
                if context.key in done:
                    counts["already_answered"] += 1
                    continue
                yield context

    with open(responses_path, "a", encoding="utf-8") as log, \
            progress(args.max_images or None, "conversations", ctx.show_progress, unit="img") as bar, \
            ThreadPoolExecutor(max_workers=args.workers) as pool:

        def collect(finished) -> None:
            for future in finished:
                bar.update(1)
                try:
                    context, reply, attempts = future.result()
                except RequestFailed as err:
                    counts["request_failed"] += 1
                    logger.warning("%s", err)
                    if counts["request_failed"] >= args.max_failures:
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise BuildError(f"{counts['request_failed']} images failed to answer (last: {err}); "
                                         "stopping: check --endpoint/--model, then rerun to resume") from err
                    continue
                counts["requests"] += attempts
                counts["answered"] += 1
                log.write(json.dumps({"key": context.key, "source": context.key.split("/")[0],
                                      "image": context.image.path, "image_w": context.image.width,
                                      "image_h": context.image.height, "boxes": context.boxes_by_text(),
                                      "model": args.model, "reply": reply}, ensure_ascii=False) + "\n")
                log.flush()

        pending: set = set()
        for context in todo():  # at most 2 x workers requests in flight: memory stays bounded
            pending.add(pool.submit(ask, context))
            if len(pending) >= 2 * args.workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                collect(finished)
        collect(wait(pending).done)
    # Convert every reply logged so far (this run's and earlier runs').
    writers: dict[str, ShardWriter] = {}
    reasons: Counter = Counter()
    data_dir = os.path.join(args.out, "data")
    with open(os.path.join(args.out, "unparseable.jsonl"), "w", encoding="utf-8") as aside:
        # in key order, so that the shards do not depend on the order in which concurrent replies arrived
        for response in sorted(read_responses(responses_path), key=lambda r: r["key"]):
            try:
                record = parse_reply(response["reply"], response)
            except Unparseable as err:
                reasons[err.reason] += 1
                aside.write(json.dumps({"key": response["key"], "reason": err.reason, "message": str(err),
                                        "reply": response["reply"]}, ensure_ascii=False) + "\n")
                continue
            source = response["source"]
            if source not in writers:
                writers[source] = ShardWriter(data_dir, f"{TAG}_generated_{source}", args.shard_size)
            writers[source].write(record)
    outputs = []
    for source, writer in sorted(writers.items()):
        for path in writer.close():
            with open(path, "rb") as f:
                count = sum(1 for line in f if line.startswith(b"{"))
            outputs.append({"path": path, "kind": TAG, "tag": TAG, "source": source, "records": count,
                            "image_folder": folders[source], "data_multiple": RECIPE_WEIGHTS[TAG]})
    write_mix(args.out, outputs)
    report = {"answered_this_run": counts["answered"], "requests_this_run": counts["requests"],
              "request_failed_this_run": counts["request_failed"],
              "skipped_already_answered": counts["already_answered"],
              "replies": sum(reasons.values()) + sum(o["records"] for o in outputs),
              "records": sum(o["records"] for o in outputs), "unparseable": sum(reasons.values()),
              "unparseable_by_reason": dict(sorted(reasons.items())), "outputs": outputs,
              "evaluation_images_left_out": {n: dict(s.eval_leaks) for n, s in ctx.report.sources.items()},
              "dropped": {n: dict(s.dropped) for n, s in ctx.report.sources.items()}}
    with open(os.path.join(args.out, "generate_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = (f"{report['records']} records from {report['replies']} replies ({report['unparseable']} unparseable: "
            + (", ".join(f"{k}={v}" for k, v in report["unparseable_by_reason"].items()) or "none")
            + f"); this run: {counts['answered']} answered in {counts['requests']} requests, "
            f"{counts['request_failed']} failed, {counts['already_answered']} already answered")
    with open(os.path.join(args.out, "generate_report.txt"), "w") as f:
        f.write(text + "\n")
    import shutil

    shutil.rmtree(ctx.out, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parser().parse_args(argv)
    if args.print_prompt:
        print(SYSTEM_PROMPT)
        return 0
    if not args.out:
        parser().error("--out is required")
    try:
        run(args)
    except BuildError as err:
        print(f"ferret data generate-conversations: error: {err}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "generate_report.txt")) as f:
        print(f.read(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
