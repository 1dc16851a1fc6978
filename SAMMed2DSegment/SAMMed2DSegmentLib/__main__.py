"""`python -m SAMMed2DSegmentLib …`: the headless command line."""

from .cli import main

raise SystemExit(main())
