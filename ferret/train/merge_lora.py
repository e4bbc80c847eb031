"""Old path of `ferret.weights.merge_lora`:
``python -m ferret.train.merge_lora`` and ``import ferret.train.merge_lora`` keep working."""

import sys

if __name__ == "__main__":
    from ferret.weights.cli import main

    sys.exit(main("merge-lora", prog="python -m ferret.train.merge_lora"))
else:
    from ferret.weights import merge_lora as _module

    sys.modules[__name__] = _module
