"""``curvbound.zoo``: the model zoo (re-exported from :mod:`curvbound.apps.zoo`)."""

from .apps.zoo import *  # noqa: F403
from .apps.zoo import __all__ as __all__
