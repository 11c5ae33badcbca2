"""A user module that fails while it is imported."""

import math

SCALE = math.sqrt(-1)  # line 5: ValueError at import time
