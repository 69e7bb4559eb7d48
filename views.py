"""``curvbound.views``: tables, Graphviz and matplotlib views of a bound (apps/views.py)."""

from .apps.views import *  # noqa: F403
from .apps.views import __all__  # noqa: F401
