"""The EfficientVLM recipe: one module per stage kind, holding the run function that
`evlm_cli/pipeline/registry.py` names for it."""
