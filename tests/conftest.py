import os

import pytest

for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")

from problems import random_problem  # noqa: E402


@pytest.fixture
def problem():
    return random_problem()


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory):
    from tiny_models import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    from tiny_models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
