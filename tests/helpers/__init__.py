"""Builders the tests share: tiny models, tiny projects, runs on disk. Test modules import from
here, never from each other."""
