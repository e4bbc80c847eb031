"""The Ferret model: configuration, CLIP tower, spatial-aware sampler, the LLaMA-based model class, loading."""
