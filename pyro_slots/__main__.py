"""``python -m pyro_slots``: the ``pyro-slots`` command line."""

from pyro_slots.cli import console_main

raise SystemExit(console_main())
