"""The one exception type that a stage raises for bad input or an impossible request.

The CLI and the DAG print its message as a single line; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A user-facing problem: bad input, an infeasible request, a missing artifact."""
