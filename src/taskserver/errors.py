"""The project's exceptions.

Every error names the input it is about and the reason, and where it helps, what to do.
`InvalidInputError` and its subclasses are never retried: retrying bad input cannot help.
"""

from __future__ import annotations


class TaskserverError(Exception):
    """Base class: an error about one named input."""

    def __init__(self, input: str, reason: str, hint: str | None = None) -> None:
        self.input = str(input)
        self.reason = reason
        self.hint = hint
        message = f"{self.input}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self):  # keep pickling (subprocesses, Prefect results) working
        return (self.__class__, (self.input, self.reason, self.hint))


class InvalidInputError(TaskserverError):
    """The input itself is wrong; running again on the same input fails the same way."""


class DocumentError(InvalidInputError):
    """A PDF that cannot be turned into text."""


class EmptyFileError(DocumentError):
    """A zero-byte file."""


class NotAPdfError(DocumentError):
    """The bytes are not a PDF at all."""


class CorruptPdfError(DocumentError):
    """A PDF whose structure is damaged or truncated."""


class EncryptedPdfError(DocumentError):
    """A PDF that needs a password."""


class NoTextLayerError(DocumentError):
    """An image-only PDF: there is no text layer and OCR is not available."""


class EmptyExtractionError(DocumentError):
    """Partitioning returned nothing for a file that looked readable."""


class EncodingInputError(InvalidInputError):
    """Texts that cannot be embedded (empty list, empty or non-string text)."""


class ClusteringInputError(InvalidInputError):
    """Vectors that cannot be clustered or indexed (k > n, NaN, dimension mismatch)."""


class TrainingDataError(InvalidInputError):
    """A training set that cannot train a classifier (one class, missing labels, bad columns)."""


class ModelDirectoryError(InvalidInputError):
    """A model directory that is missing or was not written by taskserver's trainer."""


class ModelRegistryError(InvalidInputError):
    """A challenger that cannot be compared with the champion, or a restore that cannot be done."""


class ParameterError(InvalidInputError):
    """A flow or submission parameter that fails validation."""

    @classmethod
    def not_in(cls, subject: str, reason: str, choices) -> "ParameterError":
        """A name missing from a catalogue (priorities, tasks, GPU types), listing the valid ones."""
        return cls(subject, reason, f"choose one of: {', '.join(choices)}")


class RegistrationError(InvalidInputError):
    """Installed task types that cannot join the catalogue; the bootstrap creates nothing."""

    @classmethod
    def of(cls, problems: list[str]) -> "RegistrationError":
        listed = "\n  ".join(problems)
        return cls("installed task types", f"{len(problems)} problem(s):\n  {listed}\n",
                   "nothing was created; fix the package or uninstall it, then bootstrap again")


class RequestLaneError(TaskserverError):
    """The request lane cannot take or answer a request (its database is unreachable, a wait timed out)."""


class RequestTimeoutError(RequestLaneError):
    """A request did not finish within the time its caller waited; it stays queued or running."""


class RequestLostError(RequestLaneError):
    """A request whose drainer was lost more times than its attempts allow."""


class StorageFullError(TaskserverError):
    """The output location has no space left. Not retried: free space, then run again."""


class TransientError(TaskserverError):
    """A failure that may pass on its own (network, lock, busy resource). Retried."""


def is_retryable(exc: BaseException) -> bool:
    """Retry only what might succeed next time: never bad input or a full disk."""
    if isinstance(exc, (InvalidInputError, StorageFullError)):
        return False
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        return False
    return True


class BatchFailedError(InvalidInputError):
    """Some inputs of a batch failed; the others completed and their results were kept.

    ``failures`` maps each bad input to its reason; ``partial`` carries the good part of the
    batch's result, so a pipeline can go on with what succeeded.
    """

    def __init__(
        self,
        input: str,
        reason: str,
        hint: str | None = None,
        failures: dict[str, str] | None = None,
        partial: object = None,
    ) -> None:
        super().__init__(input, reason, hint)
        self.failures = dict(failures or {})
        self.partial = partial

    def __reduce__(self):
        return (self.__class__, (self.input, self.reason, self.hint, self.failures, self.partial))

    @classmethod
    def from_failures(
        cls, failures: dict[str, str], total: int, partial: object = None
    ) -> "BatchFailedError":
        listed = "; ".join(f"{name}: {why}" for name, why in failures.items())
        return cls(
            f"{len(failures)} of {total} inputs",
            f"failed: {listed}",
            f"the other {total - len(failures)} completed and their results were saved",
            failures,
            partial,
        )
