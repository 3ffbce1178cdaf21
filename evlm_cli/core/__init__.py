"""The base every layer stands on: typed params (config), the results contract (results), the
task catalogue (catalogue), errors, atomic io, project layout, packaged models, the rank query."""
