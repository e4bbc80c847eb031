"""Decoding settings, incremental streaming, stop strings through generate, loader settings, the served model's name
and the typed "prompt too long" error, with a tiny random Ferret on the CPU."""

import json

import numpy as np
import pytest
import torch
from serve_helpers import make_checkpoint, make_image

from ferret.decoding import GREEDY_TEMPERATURE, DecodingSettings
from ferret.model.builder import load_pretrained_model, model_name_from_checkpoint
from ferret.processing import PromptTooLongError
from ferret.serve.inference import PromptTooLong, SamplingParams, TextDeltaStreamer, cut_at_stop, run_sync

PROMPT = "USER: Describe the image. ASSISTANT:"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ferret", tokenizer_dir)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_pretrained_model(checkpoint, device="cpu")


# ----------------------------------------------------------------------------------------- settings


def test_one_definition_of_greedy():
    assert DecodingSettings(temperature=0).greedy and DecodingSettings(temperature=GREEDY_TEMPERATURE).greedy
    assert not DecodingSettings(temperature=2e-4).greedy and DecodingSettings(temperature=2e-4).do_sample
    greedy = DecodingSettings(temperature=1e-5, top_p=0.5).to_generation_config()
    assert greedy.do_sample is False and greedy.max_new_tokens == 512 and greedy.num_beams == 1


def test_generation_config_of_sampling_settings(tokenizer_dir):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.unk_token
    settings = DecodingSettings(temperature=0.7, top_p=0.9, max_new_tokens=20, stop=("###", "\n"))
    config = settings.to_generation_config(tokenizer, max_new_tokens=12)
    assert isinstance(config, GenerationConfig)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, 0.9, 0)
    assert config.max_new_tokens == 12 and config.stop_strings == ["###", "\n"]
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def test_settings_refuse_bad_values_by_name():
    for kwargs, name in [({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                         ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": ("",)}, "stop"),
                         ({"temperature": True}, "temperature")]:
        with pytest.raises(ValueError, match=name):
            DecodingSettings(**kwargs)
    assert DecodingSettings(top_p=None).top_p == 1.0 and DecodingSettings(stop="END").stop == ("END",)


def test_old_names_keep_their_defaults():
    from ferret.eval.inference import GenerationConfig

    serve = SamplingParams(0.5, 0.9, 64)  # the CLI builds it positionally
    assert isinstance(serve, DecodingSettings) and (serve.temperature, serve.top_p, serve.max_new_tokens) == \
        (0.5, 0.9, 64)
    assert (SamplingParams().temperature, SamplingParams().top_p, SamplingParams().max_new_tokens) == (0.2, 0.7, 512)
    bench = GenerationConfig()
    assert isinstance(bench, DecodingSettings) and bench.greedy and bench.max_new_tokens == 1024 and bench.seed == 0


# ----------------------------------------------------------------------------------------- streaming


def test_streamer_text_grows_by_prefixes_and_ends_as_one_decode(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "a red circle [100, 200]\nand a dot, é 日本 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seen = []
    streamer = TextDeltaStreamer(tokenizer, lambda got, so_far: seen.append((len(got), so_far)))
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: skipped
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert [n for n, _ in seen] == list(range(1, len(ids) + 1))
    for (_, before), (_, after) in zip(seen, seen[1:]):
        assert after.startswith(before)
    assert "\ufffd" not in "".join(t for _, t in seen)
    assert streamer.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_cut_at_stop():
    assert cut_at_stop("one two. three.", (".",)) == ("one two", True)
    assert cut_at_stop("one two. three.", ("three", "two")) == ("one ", True)
    assert cut_at_stop("one two. three.", (".",), start=8) == ("one two. three", True)
    assert cut_at_stop("abc", ("x",)) == ("abc", False)


def _answer(loaded, settings):
    model, processor = loaded
    steps = list(run_sync(model, processor, lambda: processor.encode_prompt(PROMPT), settings, timeout=120))
    return steps[0], steps[1:-1], steps[-1]


@pytest.fixture()
def readable(loaded, monkeypatch):
    """The random model with its byte tokens (<0x..>) and <region_fea> suppressed: its answers are valid text (a
    random run of bytes is rarely UTF-8, and a streamer rightly waits for bytes that complete a character)."""
    import re

    model, processor = loaded
    tokenizer = processor.tokenizer
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    suppressed = [i for i, t in enumerate(tokens) if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t or "")]
    suppressed.append(processor.region_token_id)
    generate = model.generate
    calls = []

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs, suppress_tokens=suppressed)

    monkeypatch.setattr(model, "generate", spy)
    return model, processor, calls


def test_stop_strings_end_generation_at_the_token_that_completes_them(readable):
    model, processor, calls = readable
    readable = model, processor
    tokenizer = processor.tokenizer
    ready, middle, full = _answer(readable, DecodingSettings(max_new_tokens=24))
    assert ready.ready and full.finished and full.error is None and full.finish_reason == "length"
    # Intermediate texts grow by prefixes and end in the answer; the answer is one decode of the generated ids.
    texts = [s.text for s in middle] + [full.text]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    features = processor.model_inputs(processor.encode_prompt(PROMPT), model)
    with torch.inference_mode():
        ids = model.generate(**features, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)[0].tolist()
    assert full.text == tokenizer.decode(ids, skip_special_tokens=True) and full.num_tokens == len(ids) == 24

    # A stop string taken from the middle of that answer: the answer is cut before it, and generate stopped at the
    # first token whose text completes it (what stop_strings does), not one later.
    middle_at = len(full.text) // 2
    stop = full.text[middle_at:middle_at + 2]
    cut = full.text.find(stop)
    completing = next(k for k in range(1, len(ids) + 1)
                      if stop in tokenizer.decode(ids[:k], skip_special_tokens=True))
    assert completing < len(ids), (full.text, stop)
    _, middle, stopped = _answer(readable, DecodingSettings(max_new_tokens=24, stop=(stop,)))
    assert stopped.text == full.text[:cut] and stopped.finish_reason == "stop"
    assert stopped.num_tokens == completing
    assert all(stop not in s.text for s in middle)
    # generate got the stop string and the tokenizer, and stop_strings alone ends at that token too
    assert calls[-1]["stop_strings"] == [stop] and calls[-1]["tokenizer"] is tokenizer
    with torch.inference_mode():
        alone = model.generate(**features, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, stop_strings=[stop], tokenizer=tokenizer)
    assert alone.shape[1] == completing


# ----------------------------------------------------------------------------------------- loading


def test_loader_takes_processor_settings(checkpoint):
    model, processor = load_pretrained_model(checkpoint, device="cpu", image_aspect_ratio="pad",
                                             conv_template="ferret_v1")
    assert processor.image_aspect_ratio == "pad" and processor.conv_template == "ferret_v1"
    _, default = load_pretrained_model(checkpoint, device="cpu")
    assert default.image_aspect_ratio == "square_nocrop"
    with pytest.raises(ValueError, match="image_aspect_ratio must be one of"):
        load_pretrained_model(checkpoint, device="cpu", image_aspect_ratio="crop")
    with pytest.raises((ValueError, KeyError), match="no_such_template"):
        load_pretrained_model(checkpoint, device="cpu", conv_template="no_such_template")


def test_model_name_from_checkpoint(tmp_path):
    run = tmp_path / "ferret-7b-run"
    for folder in ("final-checkpoint", "checkpoint", "checkpoint-1500", "weights"):
        (run / folder).mkdir(parents=True)
        (run / folder / "config.json").write_text("{}")
    assert model_name_from_checkpoint(str(run / "final-checkpoint")) == "ferret-7b-run"
    assert model_name_from_checkpoint(str(run / "checkpoint") + "/") == "ferret-7b-run"
    assert model_name_from_checkpoint(str(run / "checkpoint-1500")) == "ferret-7b-run_checkpoint-1500"
    assert model_name_from_checkpoint(str(run / "weights")) == "weights"
    (run / "weights" / "config.json").write_text(json.dumps({"model_name": "ferret-13b", "_name_or_path": "vicuna"}))
    assert model_name_from_checkpoint(str(run / "weights")) == "ferret-13b"
    assert model_name_from_checkpoint("apple/ferret-7b") == "ferret-7b"  # a hub id


def test_prompt_too_long_is_a_typed_error(loaded, monkeypatch):
    from ferret.serve.model_worker import ModelWorker, error_status

    model, processor = loaded
    assert PromptTooLong is PromptTooLongError and issubclass(PromptTooLongError, ValueError)
    with pytest.raises(PromptTooLongError, match="the prompt is .* tokens; the limit is 512"):
        processor.encode_prompt("word " * 600)
    worker = ModelWorker(model, processor, "tiny-ferret", "http://127.0.0.1:1", None)
    payload = {"model": "tiny-ferret", "prompt": "word " * 600, "temperature": 0, "max_new_tokens": 4}
    with pytest.raises(PromptTooLongError) as caught:
        worker.prepare(payload)
    assert error_status(caught.value)[0] == 400
    # Too many <region_fea> also says "the limit is", but it is a refused input (422), not a prompt too long.
    monkeypatch.setattr(processor, "max_regions", 2)
    image = make_image(64, 48)
    with pytest.raises(ValueError, match="the limit is 2") as caught:
        processor.encode_prompt("<image>\n" + "<region_fea> " * 3, image, [np.ones((48, 64), bool)] * 3)
    assert not isinstance(caught.value, PromptTooLongError) and error_status(caught.value)[0] == 422
