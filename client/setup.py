"""The stubs are generated from the repository's protos/ into the wheel at build
time (gen_stubs.py); an editable install generates them in place."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_stubs import DEFAULT_OUT, DEFAULT_PROTOS, generate


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            generate(DEFAULT_PROTOS, DEFAULT_OUT)
        else:
            generate(DEFAULT_PROTOS, Path(self.build_lib) / "tally_client" / "v1")


setup(cmdclass={"build_py": BuildWithStubs})
