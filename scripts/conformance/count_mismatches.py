"""Count the fixture conversations whose ids or labels a checkout's FerretProcessor gets wrong.

    PYTHONPATH=/path/to/checkout python scripts/conformance/count_mismatches.py

Uses whichever ``ferret`` is on PYTHONPATH (so an older checkout can be compared with this one), a fast tokenizer
built from the test SentencePiece model, and each ``legacy`` setting of tokenizer_config.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def main() -> None:
    from PIL import Image
    from transformers import AutoTokenizer

    from ferret.processing import FerretProcessor
    from ferret.regions import Box, Point

    fixture = json.loads((FIXTURES / "tokenizer_conformance.json").read_text(encoding="utf-8"))
    for legacy in (None, True, False):
        with tempfile.TemporaryDirectory() as folder:
            shutil.copyfile(FIXTURES / "llama_test_tokenizer.model", Path(folder) / "tokenizer.model")
            config = {"tokenizer_class": "LlamaTokenizer"} | ({} if legacy is None else {"legacy": legacy})
            (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config))
            processor = FerretProcessor(AutoTokenizer.from_pretrained(folder), image_size=28, num_image_tokens=1)
        wrong_ids = wrong_labels = 0
        for case in fixture["cases"]:
            regions = [[Box(*r["box"]) if "box" in r else Point(*r["point"]) for r in turn]
                       for turn in case.get("regions") or []] or None
            image = Image.new("RGB", tuple(case["image"])) if case["image"] else None
            out = processor.encode(case["turns"], image, regions=regions, image_size=None if image else (64, 64),
                                   add_generation_prompt=case["generation"], truncate=False,
                                   region_feature=case.get("region_feature", True), no_coor=case.get("no_coor", False))
            wrong_ids += out["input_ids"].tolist() != case["input_ids"]
            wrong_labels += out["labels"].tolist() != case["labels"]
        setting = "absent" if legacy is None else str(legacy).lower()
        print(f"legacy {setting}: ids differ in {wrong_ids}/{len(fixture['cases'])}, "
              f"labels in {wrong_labels}/{len(fixture['cases'])}")


if __name__ == "__main__":
    main()
