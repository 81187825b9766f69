"""`capfilt ...`: parse arguments, load the config, call the library. No logic lives here.

    main.py     the parser of every command; how an error ends a command (message, exit code)
    run.py      run, rethreshold, dedup, synth: the commands that write shards
    read.py     report, calibrate: the commands that read a finished run
    loop.py     loop: BLIP's bootstrap rounds
    train.py    train, eval
    listing.py  models, recipes: what capfilt ships

Each command module has ``add_parsers(subparsers)`` and one ``cmd_*`` handler per command, which
returns the exit code. `capfilt.cli.main` is the console script.
"""

from capfilt.cli.main import main, parser

__all__ = ["main", "parser"]
