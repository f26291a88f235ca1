"""Adds the native step's portable library to the wheel where a C compiler is (the metadata is
in pyproject.toml; model/native_build.py says why and how). The wheel is then tagged for this
platform."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

_spec = importlib.util.spec_from_file_location(
    "native_build", Path(__file__).parent / "model" / "native_build.py")
native_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native_build)


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install compiles at run time, as a checkout does
            out = Path(self.build_lib) / "model"
            out.mkdir(parents=True, exist_ok=True)
            for stale in out.glob("native_step-*.so"):  # an earlier source's, in a reused build/
                stale.unlink()
            native_build.build_portable(out)


class PlatformDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPy},
      distclass=PlatformDistribution if native_build.can_build_portable() else Distribution)
