"""The stubs are generated from the repository's protos/ into the wheel at build
time (gen_stubs.py); an editable install generates them in place; an sdist
carries a copy of protos/ to build its wheel from."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_stubs import DEFAULT_OUT, DEFAULT_PROTOS, generate


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            generate(DEFAULT_PROTOS, DEFAULT_OUT)
        else:
            generate(DEFAULT_PROTOS, Path(self.build_lib) / "tally_client" / "v1")


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        copy = Path(base_dir) / "protos"
        if not copy.exists():
            shutil.copytree(DEFAULT_PROTOS, copy)


setup(cmdclass={"build_py": BuildWithStubs, "sdist": SdistWithProtos})
