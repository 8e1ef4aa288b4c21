"""Build hook: the top-level conf/ and recipes/ folders go into the package (ar2diff/conf, ar2diff/recipes) of a
built wheel, so an installed ar2diff finds its configs from any working directory (ar2diff/config/paths.py)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIG_FOLDERS = ("conf", "recipes")


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads conf/ and recipes/ from the checkout
        root = Path(__file__).resolve().parent
        for name in CONFIG_FOLDERS:
            shutil.copytree(root / name, Path(self.build_lib) / "ar2diff" / name, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConfigs})
