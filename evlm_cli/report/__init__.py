"""Torch-free readers of the results contract: runs and seed groups, tables, plots."""
