"""A Ctrl-C that Python could not raise where it arrived (inside a finalizer or an import lock's cleanup) still
ends the command with exit 130 and one error line, never with exit 0 and an "Exception ignored" traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qdiffuse import interrupts


class _RaisesOnCollection:
    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    def __del__(self) -> None:
        raise self.exc()


@pytest.fixture
def hook_installed():
    saved_hook, saved_flag = sys.unraisablehook, interrupts._installed
    interrupts._installed = False
    interrupts.install()
    yield
    interrupts._pending = None
    sys.unraisablehook, interrupts._installed = saved_hook, saved_flag


@pytest.mark.parametrize("exc", [KeyboardInterrupt, interrupts.Terminated])
def test_a_swallowed_interrupt_is_raised_at_the_next_checkpoint(hook_installed, exc) -> None:
    _RaisesOnCollection(exc)  # collected at once: Python cannot raise from __del__ and hands it to the hook
    with pytest.raises(exc):
        interrupts.raise_pending()
    interrupts.raise_pending()  # raised once, then cleared


def test_other_unraisable_errors_go_to_the_hook_that_was_there() -> None:
    saved_hook, saved_flag = sys.unraisablehook, interrupts._installed
    seen: list[type[BaseException]] = []
    sys.unraisablehook = lambda unraisable: seen.append(type(unraisable.exc_value))
    interrupts._installed = False
    try:
        interrupts.install()
        _RaisesOnCollection(ValueError)
        interrupts.raise_pending()  # nothing pending
    finally:
        sys.unraisablehook, interrupts._installed = saved_hook, saved_flag
    assert seen == [ValueError]


def test_a_progress_tick_raises_a_swallowed_interrupt(hook_installed) -> None:
    from qdiffuse.progress import progress_bar

    with progress_bar("work", 2) as bar:
        bar.advance()
        _RaisesOnCollection(KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            bar.advance()


@pytest.mark.parametrize(
    ("signal_exception", "code", "word"),
    [("KeyboardInterrupt", 130, "interrupted"), ("qdiffuse.interrupts.Terminated", 143, "terminated")],
)
def test_a_command_that_swallowed_an_interrupt_exits_with_its_code_and_one_error_line(
    signal_exception: str, code: int, word: str
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import typer
        import qdiffuse.cli as cli
        import qdiffuse.interrupts

        class Swallowed:
            def __del__(self):
                raise {signal_exception}

        build = typer.main.get_command

        def get_command(app):
            command = build(app)
            run = command.main

            def main(*args, **kwargs):
                Swallowed()
                return run(*args, **kwargs)

            command.main = main
            return command

        typer.main.get_command = get_command
        sys.argv = ["qdiffuse", "info", "--help"]
        cli.entry()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and word in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
