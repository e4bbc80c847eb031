"""Shared fixtures: a SentencePiece LLaMA tokenizer trained locally, a small processor and model. No network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from ferret.conversation import FERRET_SYSTEM

CORPUS = [
    FERRET_SYSTEM,
    "USER: What is this? ASSISTANT: a red circle [12, 450, 300, 999] and a blue square [1, 2]</s>",
    "What is the object in the image? What is in the region? Describe the image. Where is the dog?",
    "a dog, a cat, a bird, a car, a tree, a person, a green star, a yellow triangle. Yes No",
    "0 1 2 3 4 5 6 7 8 9 [ ] , . ? !",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from ferret.data.toy import train_toy_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_toy_tokenizer(out, CORPUS * 20, vocab_size=320)
    return str(out)


@pytest.fixture()
def processor(tokenizer_dir):
    from transformers import AutoTokenizer

    from ferret.processing import FerretProcessor

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return FerretProcessor(tokenizer, image_size=56, num_image_tokens=16, model_max_length=512)


@pytest.fixture()
def small_config(processor):
    from ferret.model.configs import small

    return small(len(processor.tokenizer), region_token=processor.region_token_id)


@pytest.fixture()
def model(small_config):
    from ferret.model.configs import build_model

    return build_model(small_config).eval()


@pytest.fixture()
def rng():
    return torch.Generator().manual_seed(0)
