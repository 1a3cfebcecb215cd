"""Packaging lives in setup.cfg; this file only exists for the optional CUDA build."""

from setuptools import setup

setup()
