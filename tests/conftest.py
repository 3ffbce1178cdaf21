"""Shared test setup: one torch thread (the CPUs are shared) and a scratch working directory."""

import pytest

try:
    import torch
except ImportError:  # the spec and CLI tests do not need torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    """Run the test inside an empty temporary directory, which it returns."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def easy_vqa_tokenizer(tmp_path_factory):
    """A WordPiece tokenizer folder trained on easy-VQA's train questions (200 pieces at most):
    what `prepare` takes from the prepared pairs."""
    import easy_vqa

    from evlm_cli.data.tokenizer import train_wordpiece

    out = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece(easy_vqa.get_train_questions()[0], 200, out)
    return out


def pytest_collection_modifyitems(items):
    """The pipeline modules first: xdist hands modules to its workers in collection order, and
    those two take most of the suite's time, so they must not start last."""
    first = ("test_pipeline.py", "test_pipeline_one_spec.py")
    items.sort(key=lambda item: first.index(item.path.name) if item.path.name in first else 2)
