"""General VQA: VQAv2 and TextVQA (the official 10-annotator accuracy) and GQA (exact-match accuracy).

Datasets (``--dataset``), read as published:

* ``vqav2``   questions ``v2_OpenEnded_mscoco_{split}_questions.json`` (``{"questions": [{question_id, image_id,
  question}]}``) and, for scoring, annotations ``v2_mscoco_{split}_annotations.json`` (``{"annotations":
  [{question_id, answers: [{answer, answer_id, ...}] x 10, answer_type, question_type, ...}]}``). Images
  ``{image-folder}/COCO_{split}_{image_id:012d}.jpg`` (``--image-prefix``, default from the split in the file
  name, e.g. ``COCO_val2014_``).
* ``textvqa`` ``TextVQA_0.5.1_{split}.json`` (``{"data": [{question_id, image_id, question, answers: [10
  strings], ...}]}``), images ``{image-folder}/{image_id}.jpg``.
* ``gqa``     ``{split}_balanced_questions.json`` (``{question_id: {imageId, question, answer, ...}}``), images
  ``{image-folder}/{imageId}.jpg``.

The model is asked ``"{question}\\nAnswer the question using a single word or phrase."`` (the short-answer prompt
LLaVA-style models are evaluated with; ``--prompt-suffix`` changes it).

Accuracy
--------
VQAv2 (the official evaluation, ``vqaEval.py``): the answer has newlines and tabs replaced by spaces and is
stripped, then normalised (``normalize_answer``: punctuation handled as the official ``processPunctuation``, then
lower-cased, number words to digits, articles dropped and contractions restored as ``processDigitArticle``). A
ground-truth answer list with more than one distinct answer has ``processPunctuation`` applied to each. The
accuracy of a question is the average, over the 10 ways of leaving one of the 10 human answers out, of
min(#remaining humans who gave the answer / 3, 1). Reported overall and per ``answer_type``, in percent.

TextVQA (the evaluation its authors and EvalAI use): the same 10-choose-9 average, with both the answer and every
ground-truth answer fully normalised.

GQA: an answer is right when, normalised as above, it equals the normalised ground-truth answer (the official
``eval.py`` compares the raw strings of a one-word answer; normalising only forgives "Yes." and "the table").

Predictions: this project's answers files (``question_id``, ``text``), LLaVA-style ``{question_id, text}``
lines, or a results JSON list as submitted to the evaluation servers (``[{"question_id", "answer"}]``; GQA's
``[{"questionId", "prediction"}]``). Large prediction files are streamed; unusable lines are counted by kind.

Command lines::

    python -m ferret.eval vqa infer --dataset vqav2 --model-path checkpoints/ferret-7b \\
        --questions data/vqav2/v2_OpenEnded_mscoco_val2014_questions.json --image-folder data/coco/val2014 \\
        --answers-file runs/vqav2_val.jsonl
    python -m ferret.eval vqa score --dataset vqav2 --predictions runs/vqav2_val.jsonl \\
        --annotation-file data/vqav2/v2_mscoco_val2014_annotations.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ferret.eval.common import PredictionStream, StreamAlignment, format_table, metrics_path, write_json
from ferret.eval.inference import Query, add_inference_arguments, infer_from_args
from ferret.flags import program_name

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "KEY_FIELDS",
    "exact_match_accuracy",
    "load_ground_truth",
    "load_questions",
    "main",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "score_vqa",
    "vqa_accuracy",
    "vqa_queries",
]

DATASETS = ("vqav2", "gqa", "textvqa")
KEY_FIELDS = ("question_id",)
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."

# The official normalisation tables (VQA evaluation).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


# ----------------------------------------------------------------------------------------------------------
# Normalisation and accuracy


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each punctuation mark is removed where it touches a space (or when
    the text has a comma between digits, "1,000"), else replaced by a space; a period not followed by a digit
    is removed (the official call passes ``re.UNICODE`` as the replacement count, so at most 32 are)."""
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, articles dropped, contractions
    restored ("dont" -> "don't"), words re-joined by single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """An answer as the official evaluation compares it (newlines/tabs to spaces, stripped, punctuation, digits,
    articles, contractions): ``"Two dogs."`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(answer: str, human_answers: list[str], normalize_humans: str = "official") -> float:
    """The accuracy of one answer against the human answers (10 for VQAv2 and TextVQA), in [0, 1].

    The average over each way of leaving one human answer out of min(#other humans who gave the answer / 3, 1).
    ``normalize_humans``: "official" (VQAv2: ``process_punctuation`` only, and only when the humans disagree),
    "full" (TextVQA: ``normalize_answer``) or "none".
    """
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    predicted = normalize_answer(answer)
    humans = [str(h) for h in human_answers]
    if normalize_humans == "full":
        humans = [normalize_answer(h) for h in humans]
    elif normalize_humans == "official":
        if len(set(humans)) > 1:
            humans = [process_punctuation(h) for h in humans]
    elif normalize_humans != "none":
        raise ValueError(f"normalize_humans must be 'official', 'full' or 'none', got {normalize_humans!r}")
    total = 0.0
    for left_out in range(len(humans)):
        matches = sum(1 for k, h in enumerate(humans) if k != left_out and h == predicted)
        total += min(1.0, matches / 3)
    return total / len(humans)


def exact_match_accuracy(answer: str, truth: str) -> float:
    """1.0 when the normalised answer equals the normalised truth (GQA), else 0.0."""
    return float(normalize_answer(answer) == normalize_answer(truth))


# ----------------------------------------------------------------------------------------------------------
# Files


def _load_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_questions(dataset: str, path: str | Path) -> list[dict[str, Any]]:
    """``[{question_id, image, question}]`` from a dataset's question file (``image`` is the image's file name)."""
    data = _load_json(path)
    out = []
    if dataset == "vqav2":
        match = re.search(r"(train2014|val2014|test2015|test-dev2015)", Path(path).name)
        split = {"test-dev2015": "test2015"}.get(match.group(1), match.group(1)) if match else "val2014"
        if not isinstance(data, dict) or "questions" not in data:
            raise ValueError(f"{path}: a VQAv2 question file has a 'questions' list")
        for q in data["questions"]:
            out.append({"question_id": q["question_id"], "question": q["question"],
                        "image": f"COCO_{split}_{int(q['image_id']):012d}.jpg"})
    elif dataset == "textvqa":
        if not isinstance(data, dict) or "data" not in data:
            raise ValueError(f"{path}: a TextVQA file has a 'data' list")
        for q in data["data"]:
            out.append({"question_id": q["question_id"], "question": q["question"], "image": f"{q['image_id']}.jpg"})
    elif dataset == "gqa":
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a GQA question file maps question ids to questions")
        for qid, q in data.items():
            out.append({"question_id": str(qid), "question": q["question"], "image": f"{q['imageId']}.jpg"})
    else:
        raise ValueError(f"unknown VQA dataset {dataset!r}; expected one of {DATASETS}")
    return out


def load_ground_truth(dataset: str, path: str | Path) -> list[dict[str, Any]]:
    """``[{question_id, answers: [...], answer_type}]`` (VQAv2, TextVQA) or ``[{question_id, answer, type}]`` (GQA)."""
    data = _load_json(path)
    out = []
    if dataset == "vqav2":
        if not isinstance(data, dict) or "annotations" not in data:
            raise ValueError(f"{path}: a VQAv2 annotation file has an 'annotations' list")
        for a in data["annotations"]:
            answers = [x["answer"] for x in a["answers"]]
            out.append({"question_id": a["question_id"], "answers": answers,
                        "answer_type": a.get("answer_type", "all")})
    elif dataset == "textvqa":
        for q in data["data"]:
            if "answers" not in q:
                raise ValueError(f"{path}: TextVQA question {q.get('question_id')} has no 'answers' (a test file?)")
            out.append({"question_id": q["question_id"], "answers": list(q["answers"]), "answer_type": "all"})
    elif dataset == "gqa":
        for qid, q in data.items():
            if "answer" not in q:
                raise ValueError(f"{path}: GQA question {qid} has no 'answer' (a submission-only split?)")
            types = q.get("types") or {}
            out.append({"question_id": str(qid), "answer": q["answer"],
                        "answer_type": types.get("structural", "all")})
    else:
        raise ValueError(f"unknown VQA dataset {dataset!r}; expected one of {DATASETS}")
    return out


def _prediction_records(path: str | Path) -> PredictionStream:
    """A stream over jsonl answers, or over the items of a results JSON list (``[{question_id, answer}]``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a results file is a JSON list of {{question_id, answer}}")
        return PredictionStream(data)
    return PredictionStream(path)


def _prediction_key(record: dict[str, Any]) -> str:
    return str(record["question_id"] if "question_id" in record else record["questionId"])


def _prediction_answer(record: dict[str, Any]) -> str:
    for name in ("text", "answer", "prediction"):
        if isinstance(record.get(name), str):
            return record[name]
    raise KeyError("no 'text', 'answer' or 'prediction'")


# ----------------------------------------------------------------------------------------------------------
# Scoring


def score_vqa(dataset: str, ground_truth: list[dict[str, Any]],
              predictions: PredictionStream | Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (percent) overall and per answer type; see the module docstring for each dataset's rule."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown VQA dataset {dataset!r}; expected one of {DATASETS}")
    stream = PredictionStream.of(predictions)
    alignment = StreamAlignment(ground_truth, lambda q: str(q["question_id"]), f"{dataset} question")
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for truth, record in alignment.pairs(stream, _prediction_key):
        try:
            answer = _prediction_answer(record)
        except KeyError as exc:
            stream.reject("no_text", f"question_id={truth['question_id']}", str(exc))
            continue
        if dataset == "gqa":
            accuracy = exact_match_accuracy(answer, truth["answer"])
        else:
            accuracy = vqa_accuracy(answer, truth["answers"], "official" if dataset == "vqav2" else "full")
        for bucket in ("overall", truth.get("answer_type", "all")):
            sums[bucket][0] += accuracy
            sums[bucket][1] += 1
    results = {name: {"n": int(n), "accuracy": 100.0 * total / n if n else 0.0}
               for name, (total, n) in sorted(sums.items(), key=lambda item: (item[0] != "overall", item[0]))}
    if "overall" not in results:
        results["overall"] = {"n": 0, "accuracy": 0.0}
    return {"benchmark": dataset, "results": results, "alignment": alignment.report(),
            "predictions_read": stream.report()}


# ----------------------------------------------------------------------------------------------------------
# Inference


def vqa_queries(questions: list[dict[str, Any]], image_folder: str | Path,
                prompt_suffix: str = PROMPT_SUFFIX) -> list[Query]:
    """One query per question, in file order."""
    return [
        Query(image=Path(image_folder) / q["image"], prompt=q["question"] + prompt_suffix,
              output={"question_id": q["question_id"], "image": q["image"], "question": q["question"],
                      "prompt": None, "text": None},
              where=f"question {q['question_id']} ({q['image']})")
        for q in questions
    ]


def _results_list(path: str | Path) -> Iterator[dict[str, Any]]:
    for record in PredictionStream(path):
        if "question_id" in record and isinstance(record.get("text"), str):
            yield {"question_id": record["question_id"], "answer": record["text"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name("ferret.eval.vqa"), description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    infer = sub.add_parser("infer", help="answer every question with a model")
    infer.add_argument("--dataset", required=True, choices=DATASETS)
    infer.add_argument("--questions", required=True, help="the dataset's question file (see the module help)")
    infer.add_argument("--prompt-suffix", default=PROMPT_SUFFIX, help="appended to each question")
    add_inference_arguments(infer)
    score = sub.add_parser("score", help="accuracy of a prediction file or folder")
    score.add_argument("--dataset", required=True, choices=DATASETS)
    score.add_argument("--predictions", required=True,
                       help="answers .jsonl, folder of {k}_of_{n}.jsonl chunks, or a results .json list")
    score.add_argument("--annotation-file", required=True,
                       help="VQAv2 annotations, TextVQA json, or GQA questions json (with answers)")
    score.add_argument("--output", default=None, help="metrics JSON (default: <predictions>.metrics.json beside it)")
    export = sub.add_parser("export", help="write a results JSON list for the evaluation server (VQAv2 test-dev)")
    export.add_argument("--predictions", required=True)
    export.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "infer":
        queries = vqa_queries(load_questions(args.dataset, args.questions), args.image_folder, args.prompt_suffix)
        infer_from_args(args, queries, KEY_FIELDS)
        return 0
    if args.command == "export":
        write_json(list(_results_list(args.predictions)), args.output)
        print(f"results written to {args.output}")
        return 0
    metrics = score_vqa(args.dataset, load_ground_truth(args.dataset, args.annotation_file),
                        _prediction_records(args.predictions))
    metrics["predictions"] = str(args.predictions)
    metrics["annotation_file"] = str(args.annotation_file)
    out = write_json(metrics, args.output or metrics_path(args.predictions))
    rows = [[name, r["n"], r["accuracy"]] for name, r in metrics["results"].items()]
    print(format_table(["answer type", "n", "accuracy (%)"], rows))
    print(f"unparseable: {metrics['predictions_read']['unparseable']}; metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
