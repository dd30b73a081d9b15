"""``python -m inflq.cli``: the same as the ``inflq`` command."""

from . import main

main()
