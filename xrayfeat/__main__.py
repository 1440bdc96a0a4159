"""``python -m xrayfeat`` runs the command-line interface."""

from xrayfeat.cli import main

main()
