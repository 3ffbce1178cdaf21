"""The spec: YAML with line marks (yaml_marks), `extends:` (extends), the schema and its
defaults (schema), schema errors as messages (messages), how values and key paths are written
in them (words), the domain rules (rules), and the loader that runs them in turn (load)."""
