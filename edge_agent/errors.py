"""Every error the project raises on purpose, in one tree.

::

    EdgeError                      base; str(exc) is the one line a user sees
    ├── ConfigError                a bad option, flag or config value
    │   └── ProfileError           a device profile that is missing or invalid
    ├── DataError                  calibration / eval / input data that cannot be used
    ├── ModelError                 a model that cannot be read, imported or run
    │   └── UnsupportedModelError  a valid model we cannot handle (names what and why)
    ├── ConversionError            quantization or optimisation failed
    │   └── AccuracyBudgetError    no candidate met the accuracy budget or fidelity floor
    ├── SourceError                an input (camera, stream, file, images, sensor) that cannot be
    │   │                          opened or parsed: a bad URI, a missing or corrupt file
    │   └── SourceTimeout          read() saw no new frame in time (in ``edge_agent.io.source``)
    ├── BundleError                a model bundle that cannot be read or trusted
    │   ├── UnsafeBundleError      an archive entry is a link, absolute, escapes, or too large
    │   ├── SignatureError         the manifest signature is missing or from no trusted key
    │   └── IntegrityError         an artifact's size or sha256 does not match the manifest
    ├── BrokerError                the MQTT broker refused us (CONNACK reason) or cannot be reached
    └── UpdateError                an over-the-air update that cannot go ahead: download, transfer,
                                   compatibility, anti-rollback or health window (names the cause)

Third-party errors (onnx, onnxruntime, cryptography, OpenCV, torch) are translated at the
boundary: ``raise ModelError(f"{path}: ...") from exc``.

Command-line exit codes (see ``docs/cli.md``): 0 ok, 1 internal error, 2 bad input,
3 accuracy budget not met, 4 bundle failed verification.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: an exception we did not expect (the traceback is shown with --verbose)
EXIT_BAD_INPUT = 2  # bad input: flag, file, model, data or profile
EXIT_BUDGET = 3  # the accuracy budget / fidelity floor could not be met; nothing was written
EXIT_VERIFY = 4  # a bundle failed verification (signature, integrity or unsafe archive)


def first_line(exc: BaseException) -> str:
    """The first line of a third-party error's message (or its type name): what goes into our
    one-line messages when we translate it at the boundary."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class EdgeError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(EdgeError):
    """A bad option, flag or config value."""


class ProfileError(ConfigError):
    """A device profile that is missing or invalid."""


class DataError(EdgeError):
    """Calibration, evaluation or input data that cannot be used."""


class ModelError(EdgeError):
    """A model that cannot be read, imported or run."""


class UnsupportedModelError(ModelError):
    """A valid model that this tool cannot handle."""


class ConversionError(EdgeError):
    """Quantization or optimisation failed."""


class AccuracyBudgetError(ConversionError):
    """No candidate met the accuracy budget or the fidelity floor."""

    exit_code = EXIT_BUDGET


class SourceError(EdgeError):
    """An input (camera, stream, video file, images, sensor) that cannot be opened or read: a bad
    URI, a missing or corrupt file. A live source that is lost does not raise: it reports
    ``status = "degraded"`` and reconnects."""


class BundleError(EdgeError):
    """A model bundle that cannot be read or trusted."""

    exit_code = EXIT_VERIFY


class UnsafeBundleError(BundleError):
    """An archive entry is a link, an absolute path, escapes the bundle, or is too large."""


class SignatureError(BundleError):
    """The manifest signature is missing, malformed, or from no trusted key."""


class IntegrityError(BundleError):
    """An artifact's size or sha256 does not match the signed manifest."""


class BrokerError(EdgeError):
    """The MQTT broker refused the connection (the CONNACK reason is in the message) or cannot be
    reached. The agent keeps retrying with backoff; ``edgectl`` exits with it."""


class UpdateError(EdgeError):
    """An over-the-air update that cannot go ahead: the download or transfer failed, the bundle
    does not suit this device, its version is below the anti-rollback floor, or it failed the
    health window. The device stays on its working model."""


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BUDGET",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_VERIFY",
    "AccuracyBudgetError",
    "BrokerError",
    "BundleError",
    "ConfigError",
    "ConversionError",
    "DataError",
    "EdgeError",
    "IntegrityError",
    "ModelError",
    "ProfileError",
    "SignatureError",
    "SourceError",
    "UnsafeBundleError",
    "UnsupportedModelError",
    "UpdateError",
    "first_line",
]
