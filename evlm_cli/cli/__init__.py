"""The `evlm` commands: torch-free at import; a command loads the heavy layers when it runs."""
