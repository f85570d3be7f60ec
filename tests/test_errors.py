"""ldm/errors.py: one base for bad input, reported by ``run_cli`` as one line and exit status 2."""
import pytest

from ldm.checkpoint import CheckpointError
from ldm.data.images import DataRootError, ImageLoadError
from ldm.data.personalized import TemplateError
from ldm.errors import ConfigError, UserError, run_cli
from ldm.models.diffusion.training import NonFiniteLossError
from ldm.modules.embedding_manager import EmbeddingFileError, PlaceholderError


class NewKindOfMistake(UserError):
    """Declared here only: ``run_cli`` must report it without being told about it."""


def test_a_new_user_error_is_one_line_and_exit_2_without_any_list(capsys):
    def main():
        raise NewKindOfMistake("--flag: 'x' is wrong;\n   pass   'y'")

    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: --flag: 'x' is wrong; pass 'y'\n"


def test_a_bug_keeps_its_traceback():
    def main():
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_cli(main)


def test_success_returns_quietly(capsys):
    run_cli(lambda: None)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("cls,base", [
    (ConfigError, ValueError), (CheckpointError, ValueError), (DataRootError, Exception), (ImageLoadError, Exception),
    (TemplateError, ValueError), (EmbeddingFileError, ValueError), (PlaceholderError, ValueError), (NonFiniteLossError, RuntimeError),
])
def test_every_error_of_the_package_is_a_user_error_and_keeps_its_old_base(cls, base):
    assert issubclass(cls, UserError) and issubclass(cls, base)


def test_the_old_import_path_still_works():
    from ldm.train import errors

    assert errors.ConfigError is ConfigError and errors.run_cli is run_cli
    assert all(issubclass(cls, errors.USER_ERRORS) for cls in (CheckpointError, NonFiniteLossError, NewKindOfMistake))
