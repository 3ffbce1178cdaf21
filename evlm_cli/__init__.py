"""evlm: compress vision-language models with the EfficientVLM recipe."""
