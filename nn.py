"""``curvbound.nn``: smooth layers with their rules (see :mod:`curvbound.apps.nn`)."""

from .apps.nn import *  # noqa: F403
from .apps.nn import __all__  # noqa: F401
