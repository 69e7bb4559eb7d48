"""``curvbound.experiments``: the paper's experiments (re-exported from
:mod:`curvbound.apps.experiments`; docs/experiments.md)."""

from .apps.experiments import *  # noqa: F403
from .apps.experiments import __all__ as __all__
