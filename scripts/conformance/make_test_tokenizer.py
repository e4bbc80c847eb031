"""Train the small LLaMA-style SentencePiece model the tokenizer conformance test uses.

    PYTHONPATH=. python scripts/conformance/make_test_tokenizer.py tests/fixtures/llama_test_tokenizer.model

Run once; the model is committed (a few KB). Like LLaMA's: BPE, byte fallback (so any unicode text encodes),
digits split one per piece, identity normalisation, no whitespace clean-up, a dummy prefix, unk=0, bos=1, eos=2.
The corpus covers the ferret_v1 template, coordinates and a little non-ASCII text, so prompts are a mix of
whole words, sub-words and byte pieces.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

CORPUS = [
    "What is the object in the image? What is in the region? Describe the image. Where is the dog?",
    "What are the locations of the dog, the cat and the person? Is the object a cat or a dog?",
    "a dog, a cat, a bird, a car, a tree, a person, a green star, a yellow triangle. Yes No",
    "There is a dog [12, 450, 300, 999] and a cat [1, 2] next to it.",
    "0 1 2 3 4 5 6 7 8 9 [ ] , . ? ! : ; ( ) - ' \"",
    "Le café est très bon. Über den Wolken. naïve résumé",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the SentencePiece model")
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    from ferret.data.toy import train_toy_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        train_toy_tokenizer(tmp, CORPUS * 20, vocab_size=args.vocab_size)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "tokenizer.model", args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
