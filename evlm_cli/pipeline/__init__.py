"""The stage graph: the registry of stage kinds, the compiler (specs -> dvc.yaml), code
dependencies, the DVC runner and the entry every stage runs through (`evlm stage KIND`)."""
