# setuptools needs this shim only to hand the CFFI builder over (cffi_modules has no pyproject key).
from setuptools import setup

setup(cffi_modules=["nflogd/ffi_build.py:ffibuilder"])
