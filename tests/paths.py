"""Where the tests find the repository and the reference data (importable as ``paths``: pytest.ini's pythonpath)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "equiv"  # copies of shared/reference/equiv (outputs of the original code)
REFERENCE = REPO / "tests" / "fixtures" / "reference"  # state-dict manifests of the real LDM-1.4B and SD v1 models
