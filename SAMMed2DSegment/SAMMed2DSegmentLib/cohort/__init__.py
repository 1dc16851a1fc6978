"""Cohorts: a manifest of cases run on Dask (`batch`, `evaluate --manifest`), each case through the same
command path as a single run, the model loaded once per worker. The command modules call this package;
nothing here parses the command line."""


class CohortError(ValueError):
    """A cohort that cannot start as asked (manifest, cluster, model): one line, exit status 2."""
