"""Weight tools: whole checkpoints read and written one tensor at a time.

apply_delta (released deltas -> weights), make_delta, consolidate (re-shard / cast), extract (projector and
region-sampler weights), verify (compare two checkpoints), merge_lora (LoRA adapter -> full checkpoint).
Their command lines are in `ferret.weights.cli` (``ferret weights TOOL --help``).
"""
