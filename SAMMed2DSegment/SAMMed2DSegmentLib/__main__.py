"""`python -m SAMMed2DSegmentLib …`: the headless command line."""

from .commands import main

raise SystemExit(main())
