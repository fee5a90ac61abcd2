"""``python -m flowcheck``: the same as the ``flowcheck`` command."""

from flowcheck.cli import main

main()
