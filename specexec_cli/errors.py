"""User-facing errors: the CLI prints their message as one line on stderr and exits non-zero."""


class SpecexecError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 1


class DoesNotFit(SpecexecError):
    """The memory plan refused: the weights, KV caches and tree workspace need more device memory than
    there is (a smaller batch, budget or context may fit)."""


class UsageError(SpecexecError):
    """Bad flags or input: exit code 2, like click's own usage errors."""

    exit_code = 2


class Terminated(BaseException):
    """SIGTERM arrived: raised by the CLI's handler (specexec_cli.signals) so the command unwinds like
    Ctrl-C and exits 143. A BaseException, so no `except Exception` on the way swallows it."""
