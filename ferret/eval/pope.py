"""POPE object hallucination: yes/no questions about objects, scored by accuracy, precision, recall, F1, yes-ratio.

Questions come from the POPE jsonl files (``coco_pope_{random,popular,adversarial}.json``), one object per line:
``{question_id, image, text, label}`` with label "yes" or "no". Predictions are JSON lines with the answer in
``answer`` (the original's field) or ``text``, and ``question_id`` when written by this project's inference.

Deciding yes/no from a free-form answer: by how the answer answers the question, not by whether a negation
word appears anywhere. On the first sentence only (up to the first ``.``, ``!``, ``?`` or newline):

1. A leading answer word decides: "yes", "yeah", "yep", "correct", "true", "indeed", "certainly", ... is yes;
   "no", "nope", "nah", "incorrect", "false" is no ("Yes, the cup is on the table, not the shelf." is yes).
2. Otherwise the sentence is split into clauses (at ``, ; :``, a dash, "but", "although", "while",
   "whereas", "instead", "rather than"); clauses of one word ("Unfortunately, ...") are not the answer. The
   clause that answers is the first existential one ("there is/are/was/were/'s ...", "there appears to be
   ...") or else the first clause; it is no when it is negated (``no``, ``not``, ``never``, ``cannot``,
   ``none``, ``nothing``, ``without``, ``missing``, ``lacks`` or an ``n't`` contraction, as whole words),
   else yes. So "There is no cup, but a glass" and "I don't see a cup" are no; "A cup is on the table, not
   on the shelf" and "The image shows a notebook" (not "not") are yes.

The original (``eval_pope.py``) split on spaces after dropping commas and called any ``No``/``not``/``no``
in the first sentence a no: "No!" or "There isn't a dog" counted as yes, and "Yes, there is a dog, not a
cat" or "There is a cup on the table, not on the shelf" as no.

Alignment: by ``question_id`` when every question and the first prediction have one (later predictions
without it are counted as ``no_key``); otherwise by order (the original's files have no question_id), and then
the two lists must have the same length (ValueError otherwise). "yes" is the positive class.

Inference (``infer``) asks each question's ``text`` verbatim about ``{image-folder}/{image}`` (COCO val2014) and
writes the original's fields ``question`` and ``answer`` (lower-cased), plus ``question_id`` (the file's, or
the line index when the file has none), ``image``, ``prompt`` and ``text`` (the answer as generated).

Command lines::

    python -m ferret.eval.pope infer --model-path checkpoints/ferret-7b \\
        --annotation-file data/pope/coco_pope_adversarial.json --image-folder data/coco/val2014 \\
        --answers-file runs/pope_adversarial.jsonl
    python -m ferret.eval.pope score --predictions runs/pope_adversarial.jsonl \\
        --annotation-file data/pope/coco_pope_adversarial.json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import sys
from pathlib import Path
from typing import Any

from ferret.eval.common import PredictionStream, StreamAlignment, format_table, metrics_path, read_jsonl, write_json
from ferret.eval.inference import Answer, Query, add_inference_arguments, default_record, infer_from_args
from ferret.flags import program_name

logger = logging.getLogger(__name__)

__all__ = ["KEY_FIELDS", "confusion_metrics", "decide_yes_no", "main", "pope_queries", "pope_record", "score_pope"]

KEY_FIELDS = ("question_id",)

_FIRST_SENTENCE_END = re.compile(r"[.!?\n]")
_CLAUSE_END = re.compile(r"[,;:]|\s[-\u2013\u2014]\s|\b(?:but|although|though|while|whereas|instead|rather than)\b")
_WORD = re.compile(r"[a-z]+(?:['\u2019][a-z]+)?")
_YES = {"yes", "yeah", "yep", "yup", "correct", "true", "indeed", "certainly", "absolutely", "affirmative"}
_NO = {"no", "nope", "nah", "incorrect", "false", "negative"}
_NEGATIONS = {"no", "not", "never", "cannot", "none", "nothing", "nobody", "neither", "nor", "without", "absent",
              "lacks", "lack", "missing"}
_EXISTENTIAL = re.compile(r"\bthere\s+(?:is|are|was|were|'s|\u2019s|appears?\s+to\s+be|seems?\s+to\s+be)\b")


def _negated(words: list[str]) -> bool:
    return any(word in _NEGATIONS or word.endswith(("n't", "n\u2019t")) for word in words)


def decide_yes_no(text: str) -> str:
    """"yes" or "no" for a free-form answer to "Is there a ... in the image?" (see the module docstring)."""
    first = _FIRST_SENTENCE_END.split(text.strip(), maxsplit=1)[0].lower()
    words = _WORD.findall(first)
    if words and words[0] in _YES:
        return "yes"
    if words and words[0] in _NO:
        return "no"
    clauses = [_WORD.findall(clause) for clause in _CLAUSE_END.split(first)]
    clauses = [c for c in clauses if len(c) >= 2] or [words]  # "Unfortunately, ..." is not the answer
    existential = [c for c in clauses if _EXISTENTIAL.search(" ".join(c).replace(" s ", "'s "))]
    main = existential[0] if existential else clauses[0]
    return "no" if _negated(main) else "yes"


def confusion_metrics(predicted: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as positive, plus TP/FP/TN/FN.

    A ratio with a zero denominator is 0.0.
    """
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions but {len(labels)} labels")
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predicted, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predicted, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(predicted, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predicted, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
    }


def _label(record: dict[str, Any], index: int) -> str:
    label = str(record.get("label", "")).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE question #{index} (question_id={record.get('question_id')}) has label "
                         f"{record.get('label')!r}, expected 'yes' or 'no'")
    return label


def _answer(record: dict[str, Any]) -> str:
    for field_name in ("answer", "text"):
        if field_name in record:
            return str(record[field_name])
    raise ValueError(f"POPE prediction question_id={record.get('question_id')} has neither 'answer' nor 'text'")


def score_pope(questions: list[dict[str, Any]], predictions: Any) -> dict[str, Any]:
    """POPE metrics of ``predictions`` (a list, a path or a ``PredictionStream``) against the labelled
    ``questions`` (see the module docstring)."""
    stream = PredictionStream.of(predictions)
    records = iter(stream)
    first = next(records, None)
    records = itertools.chain([first] if first is not None else [], records)
    by_id = all("question_id" in q for q in questions) and first is not None and "question_id" in first
    labels: list[str] = []
    predicted: list[str] = []

    def read(question: dict[str, Any], prediction: dict[str, Any], index: int, where: str) -> None:
        try:
            answer = _answer(prediction)
        except ValueError as exc:
            stream.reject("no_text", where, str(exc))
            return
        labels.append(_label(question, index))
        predicted.append(decide_yes_no(answer))

    if by_id:
        alignment = StreamAlignment(questions, lambda q: str(q["question_id"]), "POPE question")

        def key(record: dict[str, Any]) -> str:
            return str(record["question_id"])

        for index, (question, prediction) in enumerate(alignment.pairs(records, key, stream)):
            read(question, prediction, index, f"question_id={question['question_id']}")
        report = alignment.report()
    else:
        records = list(records)
        if len(questions) != len(records):
            raise ValueError(
                f"cannot align POPE predictions by order: {len(records)} predictions for {len(questions)} "
                "questions (and not every question has a question_id)"
            )
        for index, (question, prediction) in enumerate(zip(questions, records)):
            read(question, prediction, index, f"prediction #{index}")
        report = {"evaluated": len(labels), "missing": 0, "unexpected": 0, "duplicates": 0, "complete": True}
    metrics = confusion_metrics(predicted, labels)
    return {
        "benchmark": "pope",
        "results": metrics,
        "aligned_by": "question_id" if by_id else "order",
        "alignment": report,
        "predictions_read": stream.report(),
    }


def pope_queries(questions: list[dict[str, Any]], image_folder: str | Path) -> list[Query]:
    """One query per POPE question, in file order (see the module docstring)."""
    with_ids = all("question_id" in q for q in questions)
    queries = []
    for index, question in enumerate(questions):
        for field_name in ("image", "text"):
            if field_name not in question:
                raise ValueError(f"POPE question #{index} has no '{field_name}': {str(question)[:120]}")
        qid = question["question_id"] if with_ids else index
        queries.append(Query(
            image=Path(image_folder) / question["image"],
            prompt=question["text"],
            output={"question_id": qid, "image": question["image"], "question": question["text"], "prompt": None,
                    "answer": None, "text": None},
            where=f"POPE question {qid} ({question['image']})",
        ))
    return queries


def pope_record(answer: Answer) -> dict[str, Any]:
    """The answers-file line: the original's ``answer`` is the generated text lower-cased."""
    record = default_record(answer)
    record["answer"] = answer.text.lower()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.pope"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="answer every POPE question with a model")
    infer.add_argument("--annotation-file", "--data_path", dest="annotation_file", required=True,
                       help="POPE questions jsonl (coco_pope_{random,popular,adversarial}.json)")
    add_inference_arguments(infer)
    score = sub.add_parser("score", help="compute POPE metrics from a prediction file or folder")
    score.add_argument("--predictions", required=True, help="a .jsonl file or a folder of {k}_of_{n}.jsonl chunks")
    score.add_argument("--annotation-file", required=True, help="POPE questions jsonl with labels")
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "infer":
        infer_from_args(args, pope_queries(read_jsonl(args.annotation_file), args.image_folder), KEY_FIELDS,
                        make_record=pope_record)
        return 0
    metrics = score_pope(read_jsonl(args.annotation_file), PredictionStream(args.predictions))
    metrics["predictions"] = str(args.predictions)
    metrics["annotation_file"] = str(args.annotation_file)
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    r = metrics["results"]
    print(format_table(
        ["n", "accuracy", "precision", "recall", "F1", "yes ratio", "TP", "FP", "TN", "FN"],
        [[r["n"], r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"],
          r["TP"], r["FP"], r["TN"], r["FN"]]],
    ))
    print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
