"""Fuzzing the data path: malformed records of every kind, mixed with good ones.

* A seeded corpus (`corrupt`, one mutation per kind of damage) through the validator: each bad record is named
  (file, index, reason) with no traceback, and the loader rejects exactly the same records for the same reasons.
* A property test (hypothesis): any JSON value put anywhere in a good record; the validator never raises and the
  loader rejects a record exactly when the validator reports an error for it.
* A short training run (tiny model, one epoch) over the seeded mix: it finishes, and `skipped_records` names
  exactly the records the validator calls bad.
"""

import copy
import json
import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferret.data import validate as V
from ferret.data.grit import DataOptions, GritDataset, RecordError
from test_regions_decode import bomb

SIZE = 56


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# How each kind of damage is done to a good "refer" record (a human box with its mask), and the reason it must get.
# Each returns the damaged record as a JSON line (some damage is not expressible as a Python value).
def _set(**fields):
    return lambda r, rng: json.dumps({**r, **fields})


def _turn(t, value):
    def damage(r, rng):
        r["conversations"][t]["value"] = value(r["conversations"][t]["value"])
        return json.dumps(r)
    return damage


def _box(value):
    def damage(r, rng):
        r["box_x1y1x2y2"][0][0] = value(r["box_x1y1x2y2"][0][0], rng)
        return json.dumps(r)
    return damage


def _mask(value):
    def damage(r, rng):
        r["masks"][0][0] = value(r["masks"][0][0], rng)
        return json.dumps(r)
    return damage


def _no_image_huge(r, rng):
    r = {k: v for k, v in r.items() if k != "image"}
    r["conversations"][0]["value"] = "Where is it?"
    r["conversations"][1]["value"] = "here <bbox_location0>"
    r["box_x1y1x2y2"] = [[], r["box_x1y1x2y2"][0]]
    r["masks"] = [[], [None]]
    r["image_w"] = r["image_h"] = 10**6
    return json.dumps(r)


def _no_image(r, rng):
    r = {k: v for k, v in r.items() if k != "image"}
    r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>\n", "")
    return json.dumps(r)


DAMAGE = {
    "bad_json": lambda r, rng: json.dumps(r)[: rng.randrange(5, 40)],
    "too_deep": lambda r, rng: json.dumps(r)[:-1] + ', "extra": ' + deep(rng.choice([5_000, 100_000])) + "}",
    "not_a_record": lambda r, rng: json.dumps([r]),
    "bad_image_field": _set(image=5),
    "missing_image": _set(image="images/nope.png"),
    "missing_image_size": _set(image_w="56"),
    "image_size_mismatch": _set(image_h=SIZE + 1),
    "image_too_large": _no_image_huge,
    "bad_conversations": _set(conversations=7),
    "turn_order": lambda r, rng: json.dumps({**r, "conversations": r["conversations"][::-1]}),
    "missing_image_token": _turn(0, lambda v: v.replace("<image>", "")),
    "misplaced_image_token": _turn(1, lambda v: v + " <image>"),
    "raw_region_token": _turn(0, lambda v: v + " <region_fea>"),
    "placeholder_out_of_range": _turn(0, lambda v: v + " and <bbox_location3>"),
    "region_without_image": _no_image,
    "box_nesting": _set(box_x1y1x2y2=3),
    "bad_box": _box(lambda b, rng: b[:2] + ["x", b[3]]),
    "degenerate_box": _box(lambda b, rng: [b[2], b[1], b[0] - 1, b[3]]),
    "box_outside_image": _box(lambda b, rng: [SIZE + 5, SIZE + 5, SIZE + 9, SIZE + 9]),
    "mask_nesting": _set(masks=5),
    "bad_rle": _mask(lambda m, rng: rng.choice([bomb(), {"size": [SIZE, SIZE], "counts": [3136.5]},
                                                {"size": [SIZE, SIZE], "counts": m["counts"][:-3]},
                                                {"size": [SIZE, SIZE + 1], "counts": m["counts"]}])),
    "empty_region": _mask(lambda m, rng: {"size": [SIZE, SIZE], "counts": [SIZE * SIZE]}),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ferret.data.toy import make_world, train_toy_tokenizer, world_corpus

    root = tmp_path_factory.mktemp("fuzz_world")
    splits = make_world(root, num_train=40, num_val=0, num_test=0, image_size=SIZE, seed=3)
    train_toy_tokenizer(root / "tokenizer", world_corpus(splits["train"]), vocab_size=400)
    return root, splits["train"]


def corrupt(records: list[dict], seed: int, copies: int = 1) -> tuple[list[str], dict[int, str]]:
    """Good records with every kind of damage mixed in at seeded places: (JSON lines, {line index: reason})."""
    rng = random.Random(seed)
    refer = [r for r in records if r["box_x1y1x2y2"][0] and r["masks"][0][0] is not None]
    lines = [json.dumps(r) for r in records]
    damaged = [(kind, DAMAGE[kind](copy.deepcopy(rng.choice(refer)), rng)) for kind in DAMAGE for _ in range(copies)]
    rng.shuffle(damaged)
    for kind, line in damaged:
        lines.insert(rng.randrange(len(lines) + 1), line)
    expected = {}
    for kind, line in damaged:
        expected[lines.index(line)] = kind
    return lines, expected


def loader_verdicts(dataset) -> dict[int, str]:
    verdicts = {}
    for i in range(len(dataset)):
        try:
            dataset.encode(dataset.example(i))
        except RecordError as err:
            verdicts[dataset.source(i)[1]] = err.reason
    return verdicts


def processor_for(root):
    from transformers import AutoTokenizer

    from ferret.processing import FerretProcessor

    return FerretProcessor(AutoTokenizer.from_pretrained(str(root / "tokenizer")), image_size=SIZE,
                           num_image_tokens=16, model_max_length=256)


def test_every_kind_of_damage_is_named_by_the_validator_and_rejected_by_the_loader(world, tmp_path, capsys):
    root, records = world
    lines, expected = corrupt(records, seed=0, copies=2)
    assert len(set(expected.values())) == len(DAMAGE) and len(expected) == 2 * len(DAMAGE)
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(lines) + "\n")

    code = V.main([str(path), "--image-folder", str(root), "--dataset-type", "toy"])
    out = capsys.readouterr().out
    assert code == 1 and "Traceback" not in out
    report = V.validate([str(path)], [str(root)], ["toy"])
    errors: dict[int, set[str]] = {}
    for f in report.findings:
        assert f.file == str(path)
        if f.severity == "error":
            errors.setdefault(f.index, set()).add(f.reason)
    assert set(errors) == set(expected)
    for index, kind in expected.items():
        assert kind in errors[index], (index, kind, errors[index])
        assert f"{path}:{index} " in out
    assert report.bad == len(expected) and report.ok == len(records)

    dataset = GritDataset([str(path)], [str(root)], processor_for(root), DataOptions(seed=0), dataset_types=["toy"])
    verdicts = loader_verdicts(dataset)
    assert set(verdicts) == set(expected)
    assert all(verdicts[i] in errors[i] for i in verdicts)
    assert len(dataset.lengths) == len(dataset) and all(dataset.lengths[i] >= 0 for i in range(len(dataset)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**7) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["<image>", "<bbox_location0>", "<region_fea>", "human", "gpt", "images/train_00001.png"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["size", "counts", "from", "value", "x"]), children, max_size=3),
    max_leaves=10,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_any_value_anywhere_is_judged_alike_by_validator_and_loader(world, data):
    root, records = world
    refer = [r for r in records if r["box_x1y1x2y2"][0] and r["masks"][0][0] is not None]
    mutated = []
    for _ in range(4):
        record = copy.deepcopy(data.draw(st.sampled_from(refer)))
        path = data.draw(st.sampled_from(list(_paths(record))[1:]))
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = data.draw(json_values)
        mutated.append(record)
    file = Path(tempfile.mkdtemp(dir=root)) / "mix.json"
    file.write_text(json.dumps(mutated))
    report = V.validate([str(file)], [str(root)], ["toy"])
    flagged = {f.index for f in report.findings if f.severity == "error"}
    dataset = GritDataset([str(file)], [str(root)], processor_for(root), DataOptions(seed=0), dataset_types=["toy"])
    verdicts = loader_verdicts(dataset)
    assert set(verdicts) == flagged, (verdicts, [f.line() for f in report.findings])
    assert len(dataset.lengths) == len(dataset)


def test_training_on_the_mix_skips_exactly_the_bad_records_and_finishes(world, tmp_path):
    """One epoch (every item is asked for once) over good + damaged records: the run finishes, and the trainer
    state names exactly the records the validator calls bad, each once."""
    from ferret.train.train import main

    root, records = world
    lines, expected = corrupt(records[:20], seed=1)
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["--init_config", "small", "--tokenizer_path", str(root / "tokenizer"), "--data_path", str(path),
            "--image_folder", str(root), "--dataset_type", "toy", "--output_dir", str(out),
            "--model_max_length", "256", "--logging_steps", "1", "--seed", "0", "--report_to", "none",
            "--use_cpu", "True", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
            "--save_strategy", "no", "--group_by_length", "True"]
    assert main(args) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    skipped = {(p, k): reason for p, k, reason in state["stateful_callbacks"]["skipped_records"]}
    assert set(skipped) == {(str(path), k) for k in expected}
    report = V.validate([str(path)], [str(root)], ["toy"])
    assert {f.index for f in report.findings if f.severity == "error"} == set(expected)
    for (_, k), reason in skipped.items():
        assert reason in {f.reason for f in report.findings if f.index == k}
    logged = [h["skipped_records"] for h in state["log_history"] if "skipped_records" in h]
    assert logged == sorted(logged) and logged[-1] == len(expected)
    assert np.isfinite([h["loss"] for h in state["log_history"] if "loss" in h]).all()
    assert (out / "final-checkpoint" / "model.safetensors").is_file()
