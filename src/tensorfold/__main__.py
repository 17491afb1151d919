"""``python -m tensorfold``: the ``tensorfold`` command."""

from .cli import main

raise SystemExit(main())
