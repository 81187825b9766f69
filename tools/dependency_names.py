"""The dependencies pyproject.toml declares (with the test extra), without version bounds.

`make test-latest` installs these names with `--upgrade` to get the newest release of each;
`--versions` prints what got installed, for the record.
"""

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + project["optional-dependencies"]["test"]
names = [re.split(r"[<>=!~;\s]", r, maxsplit=1)[0] for r in requirements]  # "ray[data]>=2.60,<3" -> "ray[data]"
if "--versions" in sys.argv:
    for name in names:
        dist = name.split("[")[0]
        print(f"{dist}=={metadata.version(dist)}")
else:
    print("\n".join(names))
