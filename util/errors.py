"""Every error type a user can meet, in one place.

Command-line entry points (util/cli.py) print USER_ERRORS as one line `error: ...` with exit
status 2 (bad input: the message names the fix) and SaveError with exit status 1 (a write
failed; the previous file is intact). Each message is one line.
"""


class ConfigError(ValueError):
    """A config key, value or combination of keys is wrong."""


class InputError(ValueError):
    """An input file (image, frames, masks) is missing or unreadable."""


class DownloadError(RuntimeError):
    """A file could not be fetched or is damaged. `reason` (when set) is the short cause, for
    callers that write their own message."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class ClipFileError(DownloadError, ValueError):
    """clip_model_name names a file that is not a usable CLIP checkpoint."""


class CheckpointError(ValueError):
    """A Neural Layered Atlas checkpoint does not fit (keys, shapes, size, frame count)."""


class PromptTooLongError(ValueError):
    """A text is over CLIP's 77-token context."""


class SaveError(RuntimeError):
    """A file of the run could not be written; the previous version of it is intact."""


class FolderInUseError(RuntimeError):
    """Another live process is writing the run folder (util.processes.FolderLock)."""


class VideoWriteError(RuntimeError):
    """ffmpeg could not write a video."""


USER_ERRORS = (ConfigError, InputError, DownloadError, FileNotFoundError, PromptTooLongError, CheckpointError,
               FolderInUseError)
