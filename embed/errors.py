"""The one exception type of the embedding job: a problem the user can fix, named precisely.

The command line prints these as a one-line error instead of a stack trace.
"""

from lift_jax import cli


@cli.user_error
class EmbedError(RuntimeError):
  """Bad configuration or input; the message names the file, shard, record or key."""
