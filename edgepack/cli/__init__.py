"""The command line: one file per command, composed in app.py, errors mapped in main.py."""
