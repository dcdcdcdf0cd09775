"""An environment module that ends its process at import (the pre-flight must fail on it)."""

import os

os._exit(0)
