"""Ferret-Bench: answers judged by a GPT-style model against reference answers, summarised as a relative score.

The benchmark (``ferret_gpt4_data/{refer_caption,refer_reason,ground_conv}``, 40 questions each; the
refer_caption folder's category is ``refer_desc``) has, per category folder:

* ``question.jsonl``  ``{question_id, image, category, text}`` (regions written as 0..1 floats),
* ``context.jsonl``   ``{question_id, image, category, text}``: the objects with boxes, relations, region
  descriptions and captions the judge sees instead of the image,
* ``answer.jsonl``    the reference answers (Assistant 1),

plus one ``rule.json``: ``{category: {"role": "Assistant", "prompt": "..."}}``. The model's answers (Assistant 2)
are JSON lines ``{question_id, text, ...}``.

``review`` builds, for each question, the judge prompt::

    [Context]
    {context text}

    [Question]
    {question}

    [Assistant 1]
    {reference answer}

    [End of Assistant 1]

    [Assistant 2]
    {model answer, post-processed}

    [End of Assistant 2]

    [System]
    {rule prompt}

(with a real newline after ``[Context]``; the original wrote a literal backslash there)
and asks the judge for "s1 s2" on the first line. The model's answer is post-processed first, as the original:
for refer_desc and refer_reason the coordinate brackets are removed (``ferret.regions.strip_regions``), for
ground_conv each bracket of 0..999 grid numbers becomes 0..1 floats with three decimals (points too, where the
original crashed). Reviews are appended to the review file one line at a time, and a rerun skips the
question_ids already there. Questions, references and answers are matched by question_id, not by position.

The judge is any OpenAI-compatible chat-completions endpoint (``--judge-base-url``, ``--judge-model``, key from
the ``OPENAI_API_KEY`` environment variable), called with plain HTTP (``httpx``): temperature 0.2, max_tokens
1024, and a bounded number of tries with exponential backoff on connection errors, 429 and 5xx (the original
retried forever with a retired model and the legacy ``openai`` API).

``summarize`` reads ``review_*.jsonl`` files (also ``reviews_*`` and ``gpt4_text*``) and reports, per category
and for "all", ``round(mean(s2) / mean(s1) * 100, 1)``: the model's score relative to the reference. Reviews
whose score line could not be parsed are stored as ``[-1, -1]``; they are counted and left out of the means
(the original averaged them in). With several files, a "combined" summary pools them.

``infer`` (alias ``answer``) produces the model's answers: each question's 0..1 float brackets become regions
(a box ``[a, b, c, d]``, or a point ``[a, b]`` where the original crashed), written to the model as the
original's numbers ``[int(a*1000), ...] <region_fea>`` (not 0..1 -> pixels -> grid, which writes one unit less
for about a quarter of the questions) with a feature mask built at ``int(a*W)`` pixels, as the original. For a
checkpoint that pads images to a square (``image_aspect_ratio pad``) the processor writes the coordinates on its
padded canvas instead. Images are ``{image-folder}/{basename of image}`` (COCO val2017). Answers carry the
original's fields
``question_id, image_path, prompt, text`` plus ``category``. Where the original wrote
``{answers-file}/ferret_answer.jsonl``, the answers file here follows ``ferret.eval.inference`` (one file for
one chunk).

Command lines::

    python -m ferret.eval.ferret_bench infer --model-path checkpoints/ferret-7b \\
        --questions ferret_gpt4_data/refer_reason/question.jsonl --image-folder data/coco/val2017 \\
        --answers-file runs/bench_refer_reason.jsonl
    python -m ferret.eval.ferret_bench review --questions ferret_gpt4_data/refer_reason/question.jsonl \\
        --context ferret_gpt4_data/refer_reason/context.jsonl --reference ferret_gpt4_data/refer_reason/answer.jsonl \\
        --answers runs/bench_refer_reason --rule ferret_gpt4_data/rule.json \\
        --output runs/reviews/review_refer_reason.jsonl --judge-model gpt-4o
    python -m ferret.eval.ferret_bench summarize --dir runs/reviews --save      (alias: score)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferret.constants import GRID_SIZE
from ferret.eval.common import format_table, load_predictions, metrics_path, read_jsonl, write_json
from ferret.eval.inference import Query, add_inference_arguments, infer_from_args
from ferret.flags import program_name
from ferret.regions import (
    PLACEHOLDER,
    Box,
    Point,
    Region,
    parse_regions,
    placeholder,
    region_to_text,
    strip_regions,
    to_grid,
)

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

__all__ = [
    "FAILED_SCORES",
    "KEY_FIELDS",
    "JUDGE_SYSTEM_MESSAGE",
    "JudgeClient",
    "JudgeError",
    "bench_queries",
    "build_judge_prompt",
    "find_review_files",
    "main",
    "original_grid_text",
    "parse_scores",
    "postprocess_answer",
    "review_answers",
    "summarize",
]

JUDGE_SYSTEM_MESSAGE = "You are a helpful and precise assistant for checking the quality of the answer."
FAILED_SCORES = [-1.0, -1.0]
REVIEW_PREFIXES = ("review_", "reviews_", "gpt4_text")
KEY_FIELDS = ("question_id",)
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


# ----------------------------------------------------------------------------------------------------------
# Prompt


def postprocess_answer(text: str, category: str) -> str:
    """The model's answer as the judge sees it (see the module docstring); other categories pass unchanged."""
    if category in ("refer_desc", "refer_reason"):
        return strip_regions(text)
    if category == "ground_conv":
        pieces = []
        cursor = 0
        # With a GRID_SIZE x GRID_SIZE "image" the grid values come back unchanged in `grid`.
        for found in parse_regions(text, GRID_SIZE, GRID_SIZE):
            start, end = found.span
            floats = ", ".join(f"{v / GRID_SIZE:.3f}" for v in found.grid)
            pieces.append(text[cursor:start])
            pieces.append(f"[{floats}]")
            cursor = end
        pieces.append(text[cursor:])
        return "".join(pieces)
    return text


def build_judge_prompt(context: str, question: str, answer1: str, answer2: str, role: str, rule_prompt: str) -> str:
    """The judge's user message (see the module docstring for its layout)."""
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
        f"[System]\n{rule_prompt}\n\n"
    )


def parse_scores(review: str) -> list[float] | None:
    """The two scores on the first line of a review ("8 6", "8, 6", "8.5 7"), or None when it is not that."""
    lines = review.strip().split("\n")
    first = lines[0].replace(",", " ").split() if lines else []
    if len(first) != 2:
        return None
    try:
        return [float(first[0]), float(first[1])]
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------------------
# Answers (inference)


def _float_regions(text: str) -> tuple[str, list[tuple[float, ...]]]:
    """Replace each bracket of 2 or 4 numbers by ``<region{k}>``; returns (text, the numbers of each region)."""
    found: list[tuple[float, ...]] = []

    def replace(match: re.Match) -> str:
        try:
            values = tuple(float(v) for v in match.group(1).split(","))
        except ValueError:
            return match.group(0)  # not coordinates: leave the text alone
        if len(values) not in (2, 4):
            return match.group(0)
        found.append(values)
        return placeholder(len(found) - 1)

    return _BRACKET.sub(replace, text), found


def _bench_regions(values: list[tuple[float, ...]], where: str, width: int, height: int) -> list[Region]:
    """The regions in pixels of the image, for the feature masks (built at ``int(v * W)``, as the original)."""
    regions: list[Region] = []
    for k, v in enumerate(values):
        if any(not 0 <= x <= 1 for x in v):
            raise ValueError(f"{where}: region {k} {list(v)} is not in 0..1 coordinates")
        if len(v) == 2:
            regions.append(Point(min(v[0] * width, width - 1), min(v[1] * height, height - 1)))
        else:
            regions.append(Box(v[0] * width, v[1] * height, v[2] * width, v[3] * height))
    return regions


def original_grid_text(values: Sequence[float]) -> str:
    """The coordinates of 0..1 values as the original wrote them into the question: ``int(v * 1000)`` each.

    ``regions.to_grid(v, 1)`` is exactly ``int(v * 1000)`` clamped to the grid; writing those numbers on the
    grid itself (``region_to_text`` on a GRID_SIZE x GRID_SIZE frame) leaves them unchanged. A value of 1.0
    gives the grid's last value, 999 (the original wrote 1000, outside the grid).
    """
    grid = [float(to_grid(v, 1)) for v in values]
    region: Region = Point(*grid) if len(grid) == 2 else Box(*grid)
    return region_to_text(region, GRID_SIZE, GRID_SIZE)


def _bench_question(prompt: str, values: list[tuple[float, ...]], where: str, image, processor,
                    region_feature: bool):
    """(question, regions, within, no_coor) for one Ferret-Bench question on its image.

    Where the model input is the image itself (``square_nocrop``, the original's setting) the question carries
    the original's numbers (``original_grid_text``) and the processor adds only ``<region_fea>`` and the masks.
    Where it is not (``pad``), the processor writes the coordinates of the pixel regions on its canvas.
    """
    width, height = image.size
    regions = _bench_regions(values, where, width, height)
    frame = processor.frame(width, height)
    if (frame.left, frame.top, frame.canvas_width, frame.canvas_height) != (0, 0, width, height):
        return prompt, regions, None, False

    def replace(match: re.Match) -> str:
        coords = original_grid_text(values[int(match.group(1))])
        return f"{coords} {match.group(0)}" if region_feature else coords

    question = PLACEHOLDER.sub(replace, prompt)
    return question, (regions if region_feature else []), None, region_feature


def bench_queries(questions: Sequence[dict[str, Any]], image_folder: str | os.PathLike) -> list[Query]:
    """One query per Ferret-Bench question, in file order (see the module docstring)."""
    queries = []
    for index, question in enumerate(questions):
        where = f"Ferret-Bench question #{index} (question_id={question.get('question_id')})"
        for field_name in ("question_id", "image", "text"):
            if field_name not in question:
                raise ValueError(f"{where} has no '{field_name}'")
        prompt, values = _float_regions(question["text"])
        image_path = Path(image_folder) / Path(str(question["image"])).name
        queries.append(Query(
            image=image_path,
            prompt=prompt,
            output={"question_id": question["question_id"], "image_path": str(image_path), "prompt": None,
                    "text": None, "category": question.get("category")},
            build=partial(_bench_question, prompt, values, where),
            where=where,
        ))
    return queries


# ----------------------------------------------------------------------------------------------------------
# Judge client


class JudgeError(RuntimeError):
    """The judge endpoint failed for good (a non-retryable status, or every try failed)."""


class JudgeClient:
    """A minimal client for an OpenAI-compatible ``POST {base_url}/chat/completions``.

    Retries (at most ``max_tries`` attempts in all) on connection errors, timeouts, HTTP 429 and 5xx, and on a
    malformed response body, sleeping ``backoff_s * 2**attempt`` seconds (or the server's numeric Retry-After,
    capped at ``max_backoff_s``). Any other 4xx raises JudgeError at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.2,
        max_tokens: int = 1024,
        max_tries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 120.0,
        system_message: str = JUDGE_SYSTEM_MESSAGE,
        transport: httpx.BaseTransport | None = None,
    ):
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_tries = max_tries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.system_message = system_message
        import httpx  # imported here: only the review step needs it

        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _payload(self, content: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.system_message},
                {"role": "user", "content": content},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def complete(self, content: str) -> str:
        """The judge's reply to one user message."""
        import httpx

        problem = "no attempt made"
        for attempt in range(self.max_tries):
            wait = min(self.backoff_s * 2**attempt, self.max_backoff_s)
            try:
                response = self._http.post(self.url, json=self._payload(content))
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        return str(response.json()["choices"][0]["message"]["content"])
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        problem = f"malformed response ({exc!r}): {response.text[:200]!r}"
                elif response.status_code == 429 or response.status_code >= 500:
                    problem = f"HTTP {response.status_code}: {response.text[:200]!r}"
                    retry_after = response.headers.get("retry-after", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        wait = min(float(retry_after), self.max_backoff_s)
                else:
                    raise JudgeError(f"{self.url} answered HTTP {response.status_code}: {response.text[:300]!r}")
            if attempt + 1 < self.max_tries:
                logger.warning("judge attempt %d/%d failed (%s); retrying in %.2fs",
                               attempt + 1, self.max_tries, problem, wait)
                time.sleep(wait)
        raise JudgeError(f"{self.url} failed {self.max_tries} times; last problem: {problem}")


# ----------------------------------------------------------------------------------------------------------
# Reviews


def _index(records: Iterable[dict[str, Any]], what: str) -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for i, record in enumerate(records):
        if "question_id" not in record:
            raise ValueError(f"{what} record #{i} has no question_id: {str(record)[:120]}")
        index.setdefault(str(record["question_id"]), record)
    return index


def _load_existing_reviews(path: Path) -> list[dict[str, Any]]:
    """Reviews already written; a half-written last line (a killed run) is dropped from the file."""
    if not path.exists():
        return []
    reviews = read_jsonl(path)
    raw = path.read_text(encoding="utf-8")
    if raw and (not raw.endswith("\n") or len([line for line in raw.splitlines() if line.strip()]) != len(reviews)):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in reviews)
    return reviews


def review_answers(
    questions: Sequence[dict[str, Any]],
    contexts: Sequence[dict[str, Any]],
    references: Sequence[dict[str, Any]],
    answers: Sequence[dict[str, Any]],
    rules: dict[str, dict[str, str]],
    output: str | os.PathLike,
    client: JudgeClient,
) -> dict[str, int]:
    """Judge every question not yet reviewed in ``output`` and append one review line per question.

    Returns counts: reviewed (this call), skipped (already in the file), failed_parse (this call),
    missing_answer / missing_reference (questions left out).
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {str(r.get("question_id")) for r in _load_existing_reviews(output)}
    by_question_context = {str(c["question_id"]): c for c in contexts if "question_id" in c}
    by_image_context = {str(c["image"]): c for c in contexts if "image" in c}
    reference_by_id = _index(references, "reference answer")
    answer_by_id = _index(answers, "model answer")

    counts = {"reviewed": 0, "skipped": 0, "failed_parse": 0, "missing_answer": 0, "missing_reference": 0}
    with open(output, "a", encoding="utf-8") as f:
        for position, question in enumerate(questions):
            qid = str(question["question_id"])
            if qid in done:
                counts["skipped"] += 1
                continue
            category = question.get("category")
            if category not in rules:
                raise ValueError(f"question {qid}: category {category!r} is not in the rule file ({sorted(rules)})")
            context = by_question_context.get(qid) or by_image_context.get(str(question.get("image")))
            if context is None:
                raise ValueError(f"question {qid}: no context for question_id {qid} or image {question.get('image')!r}")
            if qid not in reference_by_id:
                logger.warning("question %s has no reference answer; not reviewed", qid)
                counts["missing_reference"] += 1
                continue
            if qid not in answer_by_id:
                logger.warning("question %s has no model answer; not reviewed", qid)
                counts["missing_answer"] += 1
                continue
            reference, answer = reference_by_id[qid], answer_by_id[qid]
            answer2 = postprocess_answer(answer["text"], category)
            rule = rules[category]
            prompt = build_judge_prompt(context["text"], question["text"], reference["text"], answer2,
                                        rule["role"], rule["prompt"])
            content = client.complete(prompt)
            scores = parse_scores(content)
            if scores is None:
                logger.warning("question %s: could not parse two scores from the review's first line %r",
                               qid, content.split("\n")[0][:80])
                counts["failed_parse"] += 1
                scores = list(FAILED_SCORES)
            review = {
                "id": position + 1,
                "question_id": question["question_id"],
                "answer1_id": reference.get("answer_id", reference["question_id"]),
                "answer2_id": answer.get("answer_id", answer["question_id"]),
                "category": category,
                "content": content,
                "tuple": scores,
                "answer1": reference["text"],
                "answer2": answer2,
                "judge_model": client.model,
            }
            f.write(json.dumps(review) + "\n")
            f.flush()
            done.add(qid)
            counts["reviewed"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------
# Summary


def find_review_files(directory: str | os.PathLike) -> list[Path]:
    """The review files of a folder: ``review_*.jsonl``, ``reviews_*.jsonl`` or ``gpt4_text*.jsonl``, sorted."""
    directory = Path(directory)
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and p.name.endswith(".jsonl") and p.name.startswith(REVIEW_PREFIXES)
    )


def _summarize_tuples(by_category: dict[str, list[list[float]]], failed: dict[str, int]) -> dict[str, Any]:
    scores: dict[str, float | None] = {}
    details: dict[str, dict[str, Any]] = {}
    for category in sorted(set(by_category) | set(failed), key=lambda c: (c == "all", c)):
        tuples = by_category.get(category, [])
        n = len(tuples)
        mean1 = sum(t[0] for t in tuples) / n if n else None
        mean2 = sum(t[1] for t in tuples) / n if n else None
        score = round(mean2 / mean1 * 100, 1) if mean1 else None
        scores[category] = score
        details[category] = {
            "score": score,
            "mean_assistant1": None if mean1 is None else round(mean1, 3),
            "mean_assistant2": None if mean2 is None else round(mean2, 3),
            "n": n,
            "failed": failed.get(category, 0),
        }
    return {"scores": scores, "details": details}


def summarize(review_files: Sequence[str | os.PathLike], ignore: Iterable[Any] = ()) -> dict[str, Any]:
    """Relative scores per review file (keyed by file stem), plus "combined" over all files when several.

    ``ignore`` lists question_ids to leave out. Each summary is ``{"scores": {category: score, "all": score},
    "details": {category: {score, mean_assistant1, mean_assistant2, n, failed}}}``.
    """
    ignored = {str(q) for q in ignore}
    per_file: dict[str, Any] = {}
    pooled: dict[str, list[list[float]]] = defaultdict(list)
    pooled_failed: dict[str, int] = defaultdict(int)
    for path in review_files:
        path = Path(path)
        by_category: dict[str, list[list[float]]] = defaultdict(list)
        failed: dict[str, int] = defaultdict(int)
        for review in read_jsonl(path):
            if str(review.get("question_id")) in ignored:
                continue
            scores = review.get("tuple", review.get("score"))
            if not isinstance(scores, (list, tuple)) or len(scores) != 2:
                raise ValueError(f"{path}: review of question {review.get('question_id')} has no [s1, s2] 'tuple'")
            categories = ["all"] + ([review["category"]] if "category" in review else [])
            for category in categories:
                if list(map(float, scores)) == FAILED_SCORES:
                    failed[category] += 1
                    pooled_failed[category] += 1
                else:
                    by_category[category].append([float(scores[0]), float(scores[1])])
                    pooled[category].append([float(scores[0]), float(scores[1])])
        per_file[path.stem] = _summarize_tuples(by_category, failed)
    summary: dict[str, Any] = {"benchmark": "ferret_bench", "files": per_file}
    if len(per_file) > 1:
        summary["combined"] = _summarize_tuples(pooled, pooled_failed)
    return summary


# ----------------------------------------------------------------------------------------------------------
# Command line


def _print_summary(summary: dict[str, Any]) -> None:
    blocks = dict(summary["files"])
    if "combined" in summary:
        blocks["combined"] = summary["combined"]
    for name, block in blocks.items():
        print(name)
        rows = [[c, d["score"], d["mean_assistant1"], d["mean_assistant2"], d["n"], d["failed"]]
                for c, d in block["details"].items()]
        print(format_table(["category", "score", "mean s1", "mean s2", "n", "failed"], rows))
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.ferret_bench"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    infer = sub.add_parser("infer", aliases=["answer"], help="answer the questions of one category with a model")
    infer.add_argument("--questions", "--data_path", dest="questions", required=True,
                       help="question.jsonl of one category folder")
    add_inference_arguments(infer)

    review = sub.add_parser("review", help="judge model answers against the reference answers")
    review.add_argument("--questions", required=True, help="question.jsonl of one category folder")
    review.add_argument("--context", required=True, help="context.jsonl of the same folder")
    review.add_argument("--reference", required=True, help="answer.jsonl (reference answers, Assistant 1)")
    review.add_argument("--answers", required=True, help="model answers: a .jsonl file or a folder of chunks")
    review.add_argument("--rule", required=True, help="rule.json")
    review.add_argument("--output", required=True, help="review_<name>.jsonl (appended to; reruns resume)")
    review.add_argument("--judge-base-url", default="https://api.openai.com/v1",
                        help="OpenAI-compatible API base; POSTs go to {base}/chat/completions")
    review.add_argument("--judge-model", required=True, help="judge model name (the original used gpt-4-0314)")
    review.add_argument("--max-tokens", type=int, default=1024)
    review.add_argument("--temperature", type=float, default=0.2)
    review.add_argument("--max-tries", type=int, default=5)

    summ = sub.add_parser("summarize", aliases=["score"], help="relative scores from review files")
    group = summ.add_mutually_exclusive_group(required=True)
    group.add_argument("--dir", help="folder of review_*.jsonl files")
    group.add_argument("--files", nargs="+", help="review files")
    summ.add_argument("--ignore", nargs="*", default=[], help="question_ids to leave out")
    summ.add_argument("--save", action="store_true", help="write <dir>.metrics.json beside the folder")
    summ.add_argument("--output", default=None, help="write the summary to this JSON file")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command in ("infer", "answer"):
        infer_from_args(args, bench_queries(read_jsonl(args.questions), args.image_folder), KEY_FIELDS)
        return 0
    if args.command == "review":
        api_key = os.environ.get("OPENAI_API_KEY")
        if not api_key:
            logger.warning("OPENAI_API_KEY is not set; calling %s without an Authorization header",
                           args.judge_base_url)
        with open(args.rule, encoding="utf-8") as f:
            rules = json.load(f)
        with JudgeClient(args.judge_base_url, args.judge_model, api_key, temperature=args.temperature,
                         max_tokens=args.max_tokens, max_tries=args.max_tries) as client:
            counts = review_answers(read_jsonl(args.questions), read_jsonl(args.context), read_jsonl(args.reference),
                                    load_predictions(args.answers), rules, args.output, client)
        print(json.dumps(counts))
        return 0

    files = find_review_files(args.dir) if args.dir else [Path(p) for p in args.files]
    if not files:
        parser.error(f"no review files found in {args.dir}")
    summary = summarize(files, args.ignore)
    _print_summary(summary)
    out = args.output
    if out is None and args.save:
        if not args.dir:
            parser.error("--save with --files needs --output")
        out = metrics_path(args.dir)
    if out is not None:
        print(f"summary written to {write_json(summary, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
