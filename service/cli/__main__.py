"""`python -m service.cli`, the same as the `thaw` entry point."""

from service.cli import app

app()
