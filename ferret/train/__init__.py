"""Supervised fine-tuning of Ferret: arguments, the Trainer subclass, the recipe (`python -m ferret.train.train`)
and the LoRA merge tool (`python -m ferret.train.merge_lora`)."""
