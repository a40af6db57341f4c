"""The options and arguments several commands share, declared once as typed aliases.

A command writes ``format: FormatOpt = Format.human`` instead of repeating the flag, its help and its
environment variable; the default stays in the signature. Options one command alone has stay in
that command's module.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from edgepack.cli.common import Format


class CompareFormat(str, Enum):
    human = "human"
    json = "json"
    markdown = "markdown"


PUBKEY_ENV = "EDGEPACK_PUBKEY"
ROOT_ENV = "EDGEPACK_ROOT"
DEVICE_ID_ENV = "EDGEPACK_DEVICE_ID"

# output
FormatOpt = Annotated[Format, typer.Option("--format", help="human or json (for programs: stdout holds the JSON alone).")]
CompareFormatOpt = Annotated[CompareFormat, typer.Option("--format", help="human, json or markdown.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]

# the project and its targets (build, compare, targets)
ProjectOpt = Annotated[Path, typer.Option("--project", "-p", help="Project folder or edgepack.yaml (default: .).")]
DistOpt = Annotated[Path, typer.Option("--out", "-o", help="Bundle folder (default: <project>/dist).")]
TargetsDirOpt = Annotated[list[Path], typer.Option("--targets-dir", help="Extra folder of target profiles; repeatable.")]
ClusterOpt = Annotated[str, typer.Option(
    "--cluster", envvar="EDGEPACK_CLUSTER", show_envvar=False,
    help="Run the builds as tasks on a Ray cluster: HOST:PORT, ray://HOST:10001 or auto (also $EDGEPACK_CLUSTER).")]

# running a model (build, validate, install)
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="Inference threads (default: the profile's).")]
RunsOpt = Annotated[int, typer.Option("--runs", min=1, help="Timed runs for latency (default: the profile's).")]

# bundles and their signatures
BundleArg = Annotated[Path, typer.Argument(help="The .edgepack bundle.")]
TrustedKeyOpt = Annotated[Path, typer.Option(
    "--pubkey", envvar=PUBKEY_ENV, help="Trusted public key: refuse unsigned, wrongly signed or modified bundles.")]
CheckKeyOpt = Annotated[Path, typer.Option(
    "--pubkey", envvar=PUBKEY_ENV,
    help="Trusted public key (PEM); also $EDGEPACK_PUBKEY. Without it, only file integrity is checked.")]

# registries and devices
PlainHttpOpt = Annotated[bool, typer.Option(
    "--plain-http", help="Talk plain HTTP (default: only to 127.0.0.1/localhost; HTTPS everywhere else).")]
RootOpt = Annotated[Path, typer.Option(
    "--root", envvar=ROOT_ENV, help="Install root on this device (also $EDGEPACK_ROOT), e.g. /var/lib/edgepack/<model>.")]
DeviceKeyOpt = Annotated[Path, typer.Option(
    "--pubkey", envvar=PUBKEY_ENV,
    help="Trusted public key (also $EDGEPACK_PUBKEY); default: ROOT/trusted.pub when present.")]
DeviceIdOpt = Annotated[str, typer.Option("--device-id", envvar=DEVICE_ID_ENV,
                                          help="Name in status files (default: the host name).")]
