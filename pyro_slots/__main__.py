"""``python -m pyro_slots``: the ``pyro-slots`` command line."""

from pyro_slots.cli import main

raise SystemExit(main())
