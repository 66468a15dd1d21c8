"""Runner tests: importing the helpers registers the scripted test backend."""

import tests.runners.helpers  # noqa: F401
