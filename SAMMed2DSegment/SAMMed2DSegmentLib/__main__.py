"""`python -P -m SAMMed2DSegmentLib …`: the headless command line.

`python -m` puts the working folder first on `sys.path`, so a `numpy.py` or `torch.py` lying in the folder
a command is run from would be imported instead of the real library. The README's commands pass `-P`
(Python 3.11+), which leaves it out; without it the folder is taken off here, before anything else is
imported (this package imports nothing heavy on its own). A folder holding a copy of this package itself
can be kept out by `-P` only.
"""

import os
import sys

if not sys.flags.safe_path and sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.getcwd():
    del sys.path[0]

from .commands import main  # noqa: E402

raise SystemExit(main())
