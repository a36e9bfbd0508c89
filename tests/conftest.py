import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEV_ZIP = Path(os.environ.get("BRAINSEG_DEV_ZIP", ROOT.parent / "shared/data/lgg-mri-segmentation-dev.zip"))


@pytest.fixture(scope="session")
def dev_zip() -> Path:
    """The real dev archive (61 patients). Skips when absent, except under CI=true where it must be there."""
    if not DEV_ZIP.is_file():
        reason = (f"real data archive not found at {DEV_ZIP}: put the dev zip there or set BRAINSEG_DEV_ZIP")
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return DEV_ZIP
