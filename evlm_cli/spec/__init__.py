"""The spec: YAML with line marks, schema messages, the domain rules, `extends:`, the schema."""
