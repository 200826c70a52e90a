"""The two exception types that ``srpo-train`` reports as one line, without a traceback.

``UserError``: something the user gave is wrong (a config key, a data file or row, the model or
tokenizer directory, a checkpoint, the run directory), and its message says which and what to do.
``srpo-train`` prints it as one line, from global rank 0 only, with no traceback; any other
exception is an internal error and keeps its full traceback. A subclass of ValueError, so callers
that catch ValueError (and the tests that expect it) see no difference.

Raise it where every rank raises it alike (the same files, the same config), or on rank 0 inside
``from_rank_0``, which re-raises it on the other ranks: the other ranks leave the report to rank 0
and only print it themselves if they are still running after a grace time (train.py).

``ServiceError``: a process the run depends on but does not own failed: a rollout engine died, did
not answer in time, or refused a call. Its message names the service and the call; the service's
own log says why. Reported like a UserError (exit code 3).
"""


class UserError(ValueError):
    pass


class ServiceError(RuntimeError):
    pass
