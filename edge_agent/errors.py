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
    │   │                          opened or read: a missing or corrupt file, an absent camera
    │   ├── SourceURIError         a source URI that cannot be parsed: an unknown scheme or
    │   │                          option, a bad option value (also a ConfigError: exit 78)
    │   └── SourceTimeout          read() saw no new frame in time (in ``edge_agent.io.source``)
    ├── BundleError                a model bundle that cannot be read or trusted
    │   ├── UnsafeBundleError      an archive entry is a link, absolute, escapes, or too large
    │   ├── SignatureError         the manifest signature is missing or from no trusted key
    │   └── IntegrityError         an artifact's size or sha256 does not match the manifest
    ├── BrokerError                the MQTT broker refused us (CONNACK reason) or cannot be reached
    ├── ProtocolError              a topic part or payload that breaks the fleet protocol (also a
    │   │                          ``ValueError``; raised by ``edge_agent.fleet.protocol``)
    │   └── OrderRefused           an order (desired state, command) refused by the device:
    │                              unsigned, unknown key, bad signature, mis-targeted, expired,
    │                              replayed, or a URL off ``[ota] allowed_hosts``
    ├── UpdateError                an over-the-air update that cannot go ahead: download, transfer,
    │                              compatibility, anti-rollback or health window (names the cause)
    ├── RolloutAborted             ``edgectl rollout`` stopped: too many devices failed
    ├── DatabaseError              ``edgectl``'s fleet database (PostgreSQL) cannot be reached,
    │                              refused us, or has a schema newer than this edgectl
    └── NoAnswer                   ``edgectl``: a device did not answer in time

Third-party errors (onnx, onnxruntime, cryptography, OpenCV, torch) are translated at the
boundary: ``raise ModelError(f"{path}: ...") from exc``.

Exit codes: one table per program, here, each with the one function that maps an error to its
code (documented once, in ``docs/cli.md``, "Exit codes"). The numbers are a contract:

- ``edge-convert`` (:class:`ConvertExit`): 0 ok, 1 internal error, 2 bad input, 3 accuracy
  budget not met (nothing written), 4 bundle failed verification. ``EdgeError.exit_code``.
- ``edge-agent`` (:class:`AgentExit`, sysexits.h, so that systemd's
  ``RestartPreventExitStatus=78`` works): 0 done, 2 usage, 65 model or data unusable, 66 source
  unavailable, 69 broker unavailable, 70 internal error (or an error with no code of its own),
  74 bundle failed verification, 75 update could not go ahead, 78 configuration error (the only
  code systemd does not restart on).
  :func:`agent_exit_code`.
- ``edgectl`` (:class:`CtlExit`): 0 ok, 1 internal error, 2 usage or bad input, 3 rollout
  aborted or a device reported failure, 4 bundle failed verification, 5 broker unreachable or
  refused, 6 no answer in time, 7 the fleet database unreachable, refused us or has a newer
  schema. :func:`edgectl_exit_code`.
"""

from __future__ import annotations

from enum import IntEnum


class ConvertExit(IntEnum):
    """``edge-convert``'s exit codes."""

    OK = 0
    INTERNAL = 1  # a bug: an exception we did not expect (the traceback is shown with --verbose)
    BAD_INPUT = 2  # bad input: flag, file, model, data or profile
    BUDGET = 3  # the accuracy budget / fidelity floor could not be met; nothing was written
    VERIFY = 4  # a bundle failed verification (signature, integrity or unsafe archive)


class AgentExit(IntEnum):
    """``edge-agent``'s exit codes (sysexits.h)."""

    OK = 0  # a finite source ended, --max-frames reached, or SIGTERM/SIGINT
    USAGE = 2  # bad command-line syntax (argparse)
    DATAERR = 65  # the model is unusable (unreadable, golden test failed, does not fit)
    NOINPUT = 66  # the source cannot be opened
    UNAVAILABLE = 69  # the broker refused us or cannot be reached (restarted with backoff)
    SOFTWARE = 70  # internal error (a bug), or an error with no code of its own
    IOERR = 74  # a bundle failed verification
    TEMPFAIL = 75  # an over-the-air update could not go ahead (restarted)
    CONFIG = 78  # configuration error (bad file, key, value, profile or missing keys)


class CtlExit(IntEnum):
    """``edgectl``'s exit codes."""

    OK = 0
    INTERNAL = 1  # a bug
    USAGE = 2  # bad command-line syntax or bad input
    FAILED = 3  # a rollout aborted, or a device reported failure
    VERIFY = 4  # a bundle failed verification
    BROKER = 5  # the broker cannot be reached or refused us
    TIMEOUT = 6  # a device did not answer in time
    DATABASE = 7  # the fleet database cannot be reached, refused us, or its schema is newer


EXIT_OK = ConvertExit.OK
EXIT_INTERNAL = ConvertExit.INTERNAL
EXIT_BAD_INPUT = ConvertExit.BAD_INPUT
EXIT_BUDGET = ConvertExit.BUDGET
EXIT_VERIFY = ConvertExit.VERIFY


#: The longest third-party message :func:`first_line` passes on, in characters
ONE_LINE_MAX = 300


def first_line(exc: BaseException) -> str:
    """A third-party error's message as one line (or its type name): what goes into our
    one-line messages when we translate it at the boundary. Its lines are joined, not cut at
    the first (onnxruntime's "Got invalid dimensions for input: … for the following indices"
    says which on the next), up to :data:`ONE_LINE_MAX` characters."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= ONE_LINE_MAX else text[: ONE_LINE_MAX - 1] + "…"


class EdgeError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code: int = EXIT_BAD_INPUT


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
    """An input (camera, stream, video file, images, sensor) that cannot be opened or read: a
    missing or corrupt file, an absent camera. A live source that is lost does not raise: it
    reports ``status = "degraded"`` and reconnects."""


class SourceURIError(ConfigError, SourceError):
    """A source URI that cannot be parsed, names an unknown scheme or option, or gives an option
    a bad value (``edge_agent.io.uri.open_source``): a configuration error (exit 78, not
    restarted), and still a ``SourceError`` for callers that catch that around opening."""


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


class ProtocolError(EdgeError, ValueError):
    """A topic part or payload that breaks the fleet protocol (the message names what)."""


class OrderRefused(ProtocolError):
    """An order the device refused (``edge_agent.fleet.orders``); the message is the reason."""


class UpdateError(EdgeError):
    """An over-the-air update that cannot go ahead: the download or transfer failed, the bundle
    does not suit this device, its version is below the anti-rollback floor, or it failed the
    health window. The device stays on its working model."""


class RolloutAborted(EdgeError):
    """A staged rollout stopped because too many devices failed (or a device reported failure)."""

    exit_code = CtlExit.FAILED


class NoAnswer(EdgeError):
    """A device did not answer in time."""

    exit_code = CtlExit.TIMEOUT


class DatabaseError(EdgeError):
    """``edgectl``'s fleet database (PostgreSQL, ``--db``) cannot be reached, refused us, or
    holds a schema newer than this edgectl knows (the message says which, never the password)."""

    exit_code = CtlExit.DATABASE


def agent_exit_code(exc: EdgeError) -> int:
    """``edge-agent``'s code for an error that ended it. Only a configuration error is 78, the
    code systemd does not restart on: a model, a source or a broker that fails is restarted."""
    codes: tuple[tuple[type[EdgeError], AgentExit], ...] = (
        (ConfigError, AgentExit.CONFIG),
        (BundleError, AgentExit.IOERR),
        (SourceError, AgentExit.NOINPUT),
        (ModelError, AgentExit.DATAERR),
        (DataError, AgentExit.DATAERR),
        (BrokerError, AgentExit.UNAVAILABLE),
        (UpdateError, AgentExit.TEMPFAIL),
    )
    return next((code for kind, code in codes if isinstance(exc, kind)), AgentExit.SOFTWARE)


def edgectl_exit_code(exc: EdgeError) -> int:
    """``edgectl``'s code for an error that ended it."""
    if isinstance(exc, BundleError):
        return CtlExit.VERIFY
    if isinstance(exc, BrokerError):
        return CtlExit.BROKER
    if isinstance(exc, (RolloutAborted, NoAnswer, DatabaseError)):
        return int(exc.exit_code)
    return CtlExit.USAGE


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BUDGET",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_VERIFY",
    "AccuracyBudgetError",
    "AgentExit",
    "BrokerError",
    "BundleError",
    "ConfigError",
    "ConversionError",
    "ConvertExit",
    "CtlExit",
    "DataError",
    "DatabaseError",
    "EdgeError",
    "IntegrityError",
    "ModelError",
    "NoAnswer",
    "OrderRefused",
    "ProfileError",
    "ProtocolError",
    "RolloutAborted",
    "SignatureError",
    "SourceError",
    "SourceURIError",
    "UnsafeBundleError",
    "UnsupportedModelError",
    "UpdateError",
    "agent_exit_code",
    "edgectl_exit_code",
    "first_line",
]
