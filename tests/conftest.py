import os

# Keep the 2-core machines responsive: one intra-op thread per test process (each spawned rank
# inherits this); torch otherwise starts one thread per core in every process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sglang_python() -> str:
    """The Python of the SGLang environment (``scripts/install.sh --sglang``) that the ``sglang``
    tier runs real servers with; ``SRPO_SGLANG_PYTHON`` names another. Missing, the tier fails:
    deselect it with ``-m "not sglang"``."""
    path = Path(os.environ.get("SRPO_SGLANG_PYTHON", Path(__file__).parents[1] / ".venv-sglang/bin/python"))
    if not path.is_file():
        pytest.fail(
            f"the sglang tier runs real SGLang servers with {path}: make it with "
            "`bash scripts/install.sh --sglang`, or deselect the tier with -m 'not sglang'"
        )
    return str(path)
