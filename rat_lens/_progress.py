"""A progress line on stderr for the CLI's slow steps (loading, generating, tracing)."""

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextmanager
def progress(description: str):
    """Show ``description`` with a spinner and elapsed time while the block runs (terminals only:
    piped output stays clean)."""
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not sys.stderr.isatty()) as bar:
        bar.add_task(description, total=None)
        yield
