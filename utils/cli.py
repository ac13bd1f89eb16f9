"""One convention for errors in every command-line script (docs/safety.md, "Errors").

A problem with what the user handed us (a file, a flag, a config) ends the script with ONE line on stderr,

    error: <what>: <why>

and exit code 2. User errors are UserError and its subclasses (the loaders' named errors: CheckpointError,
ArrayFileError, ConfigError, RecordIOError, BinLoadError, MetaFileError) and the OSErrors of a path that cannot be
opened (missing, a directory, no permission). Anything else is a bug in this project and keeps its traceback.
TRANSFACE_DEBUG=1 shows the traceback of user errors too.

    if __name__ == "__main__":
        run_main(main)
"""
import argparse
import json
import os
import subprocess
import sys

DEBUG_ENV = "TRANSFACE_DEBUG"
EXIT_USER_ERROR = 2
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class UserError(ValueError):
    """A file, flag or config the user gave us is wrong; the message names it and says what was expected."""


def one_line(error):
    """The message of a user error on one line: '<path>: <reason>' for an OSError that carries a path."""
    if isinstance(error, OSError) and error.filename is not None:
        text = f"{error.filename}: {error.strerror or error}"
    else:
        text = str(error) or type(error).__name__
    if "\nOriginal Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own message
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def debug_enabled():
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(main):
    """Run main() and exit with its return value (None -> 0); a user error prints one line and exits 2."""
    if debug_enabled():
        sys.exit(main())
    try:
        code = main()
    except (UserError,) + PATH_ERRORS as error:
        sys.stdout.flush()
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code)


def json_object(text):
    """argparse type of a JSON-object flag (--network-kwargs '{"depth": 2}'): a bad value is a usage error."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"depth\": 2}}', got {text!r}")
    return value


def run_script(command, cwd):
    """Run another of our scripts (tools/demo.py, tools/ablation.py); its failure ends this one. The child has
    already printed its own error, so this one only says which step failed."""
    print("+ " + " ".join(command), flush=True)
    code = subprocess.run(command, cwd=cwd).returncode
    if code != 0:
        raise UserError(f"{' '.join(command[1:3])}: exited with status {code} (see its error above)")
