"""Where the tests find the repository and the reference data (importable as ``paths``: pytest.ini's pythonpath)."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "equiv"  # copies of shared/reference/equiv (outputs of the original code)
REFERENCE = REPO / "tests" / "fixtures" / "reference"  # state-dict manifests of the real LDM-1.4B and SD v1 models


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the scripts are files, not a package), registered under ``name``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
