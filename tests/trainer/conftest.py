import pytest
from tiny_training import make_tiny_inputs


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    make_tiny_inputs(root)
    return root
