"""User-facing errors and the collective agreement that makes every rank see them."""
import re


class HpcattnError(ValueError):
    """A problem with the user's input or environment, worded for the user.

    `collective` is True when every rank of the job raised the same error (so the job can
    end cleanly with exit status 1 on every rank instead of aborting).
    """

    def __init__(self, message, collective=False):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(message)))  # one line, whatever HDF5 said
        self.collective = collective


def agree(comm, problem):
    """Collective: raise HpcattnError on every rank if any rank reports a problem.

    `problem` is this rank's message or None. The message of the lowest failing rank wins,
    prefixed by that rank when there is more than one rank.
    """
    agree_on(comm.allgather_object(problem))


def agree_on(gathered):
    """Raise on every rank if an allgathered list holds a message (str) from any rank."""
    for rank, msg in enumerate(gathered):
        if isinstance(msg, str) and msg:
            where = f"rank {rank}: " if len(gathered) > 1 else ""
            raise HpcattnError(where + msg if not msg.startswith("rank ") else msg, collective=True)


def collectively(comm, fn, *args, **kwargs):
    """Run fn on every rank; if it fails on any rank with a user-level error, fail on all.

    User-level errors are HpcattnError and the OSError/KeyError/ValueError/TypeError that
    h5py and numpy raise for bad files; anything else is a bug and propagates unchanged.
    """
    try:
        result, problem = fn(*args, **kwargs), None
    except HpcattnError as e:
        result, problem = None, str(e)
    except (OSError, KeyError, ValueError, TypeError) as e:
        result, problem = None, f"{type(e).__name__}: {e}"
    agree(comm, problem)
    return result
