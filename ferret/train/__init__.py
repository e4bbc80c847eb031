"""Supervised fine-tuning of Ferret: arguments, the Trainer subclass and the recipe (`python -m ferret.train.train`,
or `ferret train`). The LoRA merge tool moved to `ferret.weights.merge_lora` (the old path still works)."""
