"""A Dask worker preload (`distributed.worker.preload`) that makes the worker process die the way an
out-of-memory kill does, for one case only: it isolates the trigger, so the handling under test (the
scheduler losing the worker, the nanny starting a new one, the client's record of the case) is the product's
own code on a real cluster.

The worker dies when the task of the case named `CASE` has finished executing but before the worker tells
the scheduler: the case has written all its files into its temporary folder, and the client must still
treat it as failed and leave none of them behind."""

from __future__ import annotations

import os

from distributed import WorkerPlugin

CASE = "crash"


class DieAfterCase(WorkerPlugin):
    """`os._exit` (no clean-up, no goodbye to the scheduler) when the task for `CASE` leaves `executing`."""

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        # The batch runner names its tasks "...-<case>" (should that change, the case lives: the test fails).
        if start == "executing" and finish == "memory" and str(key).endswith(f"-{CASE}"):
            os._exit(1)


async def dask_setup(worker) -> None:
    """Run by every worker process at start, the nanny's replacements included."""
    await worker.plugin_add(DieAfterCase(), name="die-after-case")
