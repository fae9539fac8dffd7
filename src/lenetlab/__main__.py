"""python -m lenetlab: the command line, as the `lenetlab` script runs it."""

from .cli import run

run()
