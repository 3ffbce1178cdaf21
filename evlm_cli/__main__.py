"""`python -m evlm_cli` is the `evlm` command."""

from evlm_cli.cli.main import main

main()
