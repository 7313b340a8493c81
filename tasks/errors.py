"""The one exception type that a stage raises for bad input or an impossible request.

The CLI and the DAG print its message as a single line; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A user-facing problem: bad input, an infeasible request, a missing artifact."""


def named_error(param_name: str, parse, value):
    """parse(value), its error prefixed with the Param it came from."""
    try:
        return parse(value)
    except PipelineError as exc:
        raise PipelineError(f"Param {param_name}: {exc}") from None
