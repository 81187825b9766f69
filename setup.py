"""Build hook, nothing else (the project is declared in pyproject.toml).

capfilt's data has one home each, at the repository's top level: ``models/`` (model presets and
the tiny tokenizer vocabulary) and ``pipelines/`` (recipes). A source checkout, and an editable
install of it, reads them there. A built package (wheel, or a non-editable ``pip install``) gets
a copy inside the package, as ``capfilt/presets`` and ``capfilt/recipes``, where
``capfilt.shipped.shipped_dir`` finds them; ``tests/test_wheel.py`` installs a wheel and uses them.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DATA = {"models": "presets", "pipelines": "recipes"}  # capfilt.shipped.SHIPPED: the same names


class BuildWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's own folders
        for folder, name in DATA.items():
            target = Path(self.build_lib, "capfilt", name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(HERE / folder, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildWithData})
