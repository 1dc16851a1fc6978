"""`python -m SAMMed2DSegmentLib.service`: the engine process (started by the Slicer module's client)."""

import sys

from .server import main

sys.exit(main())
