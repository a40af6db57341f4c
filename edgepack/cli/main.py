"""The entry point. It imports almost nothing before it is ready for Ctrl-C and SIGTERM, so an
interrupt at any moment (even while the CLI's modules load) ends with one `error:` line, not a
traceback; errors are mapped in :mod:`edgepack.cli.group`."""

from __future__ import annotations

import sys

from edgepack import interrupts


def main() -> None:
    interrupts.install()
    try:
        from edgepack.cli.app import app

        interrupts.check()  # a signal that arrived while the CLI's modules loaded
        app(prog_name="edgepack")
    except KeyboardInterrupt as e:  # before a command started (imports) or after it ended
        from edgepack.cli.group import interrupted, report

        exc = interrupted(e)
        report(exc)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
