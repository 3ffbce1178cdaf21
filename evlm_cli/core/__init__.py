"""The base every layer stands on: typed params, errors, atomic io, project layout, ranks."""
