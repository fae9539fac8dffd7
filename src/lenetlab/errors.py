"""Typed errors: the Python API raises them; the CLI turns each into one line on stderr and exit status 2.

Stopped is no error: a run stopped by the user, which the CLI ends with its status.
"""


class LenetlabError(Exception):
    """Base class: bad input from outside (a file, an option, a run folder)."""


class DataError(LenetlabError):
    """The Fashion-MNIST files are missing, truncated, corrupt or mismatched."""


class WeightsError(LenetlabError):
    """A weights file is missing or is not a LeNet5V1 state_dict."""


class RunDirError(LenetlabError):
    """A run folder is missing, is not a lenetlab run, or is damaged."""


class SpecError(LenetlabError):
    """A sweep specification or option value is malformed."""


class OutputError(LenetlabError):
    """A folder lenetlab must write to cannot be created or written."""


class ImageError(LenetlabError):
    """An image file to classify is missing, empty, corrupt, too large or not an image."""


class OptionError(SpecError):
    """A bad option value, named as the caller spelled it: the keyword in Python (weight_decay),
    the flag on the command line (--weight-decay). {option} in the message stands for either."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(message.replace("{option}", key))

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def on_command_line(self) -> str:
        return self.message.replace("{option}", self.flag)


class Stopped(KeyboardInterrupt):
    """A run stopped by Ctrl-C (status 130) or SIGTERM (143), after its finished trials and
    each running trial's last epoch were saved and the line saying how to resume was printed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status
