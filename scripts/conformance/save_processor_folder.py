"""Save a FerretProcessor built on the test SentencePiece model, for the original's stack to load.

    PYTHONPATH=. python scripts/conformance/save_processor_folder.py /tmp/ferret_saved
    /tmp/oldstack/bin/python scripts/conformance/record_tokenizer_fixture.py --check-saved /tmp/ferret_saved

The second command (transformers 4.31's slow LlamaTokenizer, loaded as the original's model builder does) writes
tests/fixtures/saved_folder_in_transformers_4_31.json: whether that folder gives the recorded ids for every
conversation of the conformance fixture. The tokenizer is loaded with transformers 5 from tokenizer.model and a
tokenizer_config.json without ``legacy``, the case where transformers 5's own ids differ most.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

MODEL = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llama_test_tokenizer.model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from ferret.processing import FerretProcessor

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(MODEL, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        processor = FerretProcessor(AutoTokenizer.from_pretrained(tmp))
        processor.save_pretrained(str(args.out))
    print(f"saved {sorted(p.name for p in args.out.iterdir())} to {args.out}")


if __name__ == "__main__":
    main()
