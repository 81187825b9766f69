"""`python -m capfilt.cli ...`, as the `capfilt` console script."""

import sys

from capfilt.cli.main import main

sys.exit(main())
