"""The EfficientVLM recipe, one module per stage; `stages/*.py` are thin wrappers around these."""
