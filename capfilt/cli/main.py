"""`capfilt ...`: the parser of every command, and how an error ends one (message, exit code)."""

from __future__ import annotations

import argparse
import logging
import sys

from capfilt.cli import listing, loop, read, run, train


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="capfilt",
        description="BLIP CapFilt at scale: caption, filter and rerank "
        "image-text WebDataset shards; write cleaned shards and a per-caption ledger.",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the Python traceback (accepted anywhere on the command line)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    for commands in (run, read, loop, train, listing):  # the order `capfilt --help` lists them in
        commands.add_parsers(sub)
    return ap


# What to do after Ctrl-C, by command: the resumable ones pick up where they stopped.
RESUME_HINTS = {
    "run": "rerun the same command to resume",
    "loop": "rerun the same command to resume",
    "rethreshold": "rerun the same command to resume",
    "dedup": "rerun the same command to resume",
    "train": "rerun the same command with --resume to continue from the last checkpoint",
}


# capfilt's errors whose messages are written for the user (printed as they are), and those that
# are a user's mistake (exit 2), as (module, class): a module the command never imported cannot
# have raised one, so neither --help nor a config error imports the model code to catch them.
OWN_MESSAGES = (
    ("capfilt.config", "ConfigError"),
    ("capfilt.io.run_dir", "ResumeRefused"),
    ("capfilt.modeling.presets", "ModelRefError"),
)
USER_ERRORS = (("capfilt.io.run_dir", "ResumeRefused"),)


def _raised_types(names) -> tuple[type, ...]:
    """The classes of ``names`` whose modules this process has imported."""
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


def _message(err: BaseException) -> str:
    """The error as capfilt prints it: its own messages as written, anyone else's on one line."""
    if isinstance(err, _raised_types(OWN_MESSAGES)):
        return str(err)
    if isinstance(err, OSError) and err.filename and err.strerror and type(err).__module__ == "builtins":
        text = f"{err.filename}: {err.strerror[:1].lower()}{err.strerror[1:]}"
    else:
        text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, ImportError) and ("s3fs" in text or "gcsfs" in text):
        text += " (pip install 'capfilt[s3]' or 'capfilt[gcs]')"
    if isinstance(err, ImportError) and "aiohttp" in text:
        text += " (http:// and https:// inputs: pip install 'capfilt[http]')"
    return text if len(text) <= 600 else text[:600] + " …"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = parser().parse_args([a for a in argv if a != "--debug"])
    # Our own log lines at INFO; third-party libraries (open_clip logs every load step) only at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The package's logger: every module logs to getLogger(__name__), a child of it.
    logging.getLogger("capfilt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # A mistake a user can make (config, model reference, input, output, device) is one message and
    # exit 2; an interrupt is one line and 130; anything else one line and 1. --debug: the traceback.
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = RESUME_HINTS.get(args.command)
        print("capfilt: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if not isinstance(err, (ValueError, OSError, ImportError, *_raised_types(USER_ERRORS))):
            print(
                f"capfilt: error: {type(err).__name__}: {_message(err)} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
            return 1
        print(f"capfilt: error: {_message(err)}", file=sys.stderr)
        return 2
