"""The one error hierarchy. Each class carries its exit code and a default hint.

The CLI catches :class:`EdgepackError` once, prints ``error: ...`` and ``hint: ...`` and exits
with ``exit_code``. Library code raises these and never prints.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class EdgepackError(Exception):
    exit_code = 1
    default_hint = "run with --debug for the traceback"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint


class ConfigError(EdgepackError):
    """A bad project file, target profile or command-line flag."""

    exit_code = 2
    default_hint = "check the file and key named above; `edgepack init` writes a commented example"


class AcceptanceError(EdgepackError):
    """A gate failed. The bundle is kept and its manifest says why."""

    exit_code = 3
    default_hint = "the bundle was written; its manifest lists the failed gates (`edgepack inspect`)"

    def __init__(self, message: str, hint: str | None = None, bundle: str | None = None):
        super().__init__(message, hint)
        self.bundle = bundle


class MissingDependencyError(EdgepackError):
    exit_code = 4

    def __init__(self, package: str, extra: str, purpose: str = "", hint: str | None = None):
        what = f" ({purpose})" if purpose else ""
        super().__init__(
            f"the Python package '{package}' is not installed{what}",
            hint=hint or f"pip install 'edgepack[{extra}]'",
        )
        self.package = package
        self.extra = extra


class ToolchainError(EdgepackError):
    """A converter or runtime failed. ``log`` says where its full output was kept."""

    exit_code = 5
    default_hint = "the toolchain's own message is above; rerun with --debug for the traceback"


class CalibrationError(EdgepackError):
    """Calibration or evaluation data is empty, or of the wrong shape or dtype."""

    exit_code = 6
    default_hint = "check the calibration/evaluation source in edgepack.yaml against `inputs`"


class BundleError(EdgepackError):
    """A bundle is corrupt, tampered with, or of an unknown schema."""

    exit_code = 7
    default_hint = "rebuild the bundle or fetch it again; do not edit files inside a bundle"


class ValidationError(EdgepackError):
    """A bundle ran on this machine but did not reproduce its recorded outputs."""

    exit_code = 8
    default_hint = "the validation report lists the samples that differ; the device may need another target profile"


class ModelError(EdgepackError):
    """The model cannot be loaded, or does not match what the project file declares."""

    exit_code = 9
    default_hint = "check `model` and `inputs` in edgepack.yaml"


class SignatureError(BundleError):
    """The bundle's signature is missing, made with another key, or no longer matches manifest.json.

    One class with its own exit code; the message says which of the three it is (``reason``)."""

    exit_code = 10
    default_hint = "fetch the bundle again from its publisher, or check that --pubkey is the key it was signed with"

    def __init__(self, message: str, hint: str | None = None, reason: str = "invalid"):
        super().__init__(message, hint)
        self.reason = reason


class RegistryError(EdgepackError):
    """An OCI registry refused a request (authentication, permissions, an unexpected answer)."""

    exit_code = 11
    default_hint = "check the reference and your login for this registry (~/.docker/config.json)"


class RegistryUnreachableError(RegistryError):
    """No connection to the registry after the retries."""

    exit_code = 12
    default_hint = "check the address and port, that the registry is running, and the network between"


class NotInRegistryError(RegistryError):
    """The repository, tag or digest does not exist in the registry."""

    exit_code = 13
    default_hint = "check the tag; `edgepack push` prints the tags and digest it wrote"


class DigestMismatchError(BundleError):
    """Bytes fetched from a registry do not match the digest that names them."""

    exit_code = 14
    default_hint = "the download was corrupted or the registry served other content; pull again, pin by digest"


class DiskFullError(EdgepackError):
    """No space left while writing; nothing partial is kept."""

    exit_code = 15
    default_hint = "free space in the folder named above (old versions: `edgepack status`), then retry"


class WrongTargetError(ConfigError):
    """The bundle was built for hardware this machine is not (a Jetson bundle on an x86 box)."""

    exit_code = 16
    default_hint = "pull the bundle built for this device's target; --force installs it anyway"


class InstallError(EdgepackError):
    """The install root cannot be used: locked by another install, unreadable, nothing to roll back."""

    exit_code = 17
    default_hint = "`edgepack status --root DIR` shows the active and previous versions"


class ClusterError(EdgepackError):
    """The Ray cluster named by --cluster / $EDGEPACK_CLUSTER cannot be reached or used."""

    exit_code = 18
    default_hint = ("start one with `ray start --head`, then pass its address (--cluster HOST:6379, ray://HOST:10001 "
                    "or auto); without --cluster everything runs on this machine")


class InterruptedBuildError(EdgepackError):
    """Ctrl-C (SIGINT)."""

    exit_code = 130
    default_hint = "nothing was written; run the command again"


class TerminatedError(InterruptedBuildError):
    """SIGTERM: handled like Ctrl-C (scratch folders removed, the install root unchanged)."""

    exit_code = 143


def no_space(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT at the root of ``exc``, if any: converters wrap it in their own errors."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return exc
        if "No space left on device" in str(exc):
            return OSError(errno.ENOSPC, "No space left on device")
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def native_write_error(e: BaseException, path, doing: str) -> EdgepackError:
    """A write by native code (OpenVINO's serializer and the like) failed with a message that does not
    say why ("basic_ios::clear: iostream error"): a full file system is the usual cause, so check it."""
    import shutil
    from pathlib import Path

    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if no_space(e) or (free is not None and free < (4 << 20)):
        return DiskFullError(f"no space left in {folder} while {doing} ({free if free is not None else '?'} bytes free)")
    return ToolchainError(f"{doing} failed: {e}")


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The closest of ``choices`` to ``word``, or None when nothing is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    match = close_match(word, choices)
    if match:
        return f"did you mean '{match}'? (known: {', '.join(choices)})"
    return f"known: {', '.join(choices)}"
