"""Other YAML files read the way a topology is read: a value's line and column,
``${VAR}`` from the environment (never echoed back), and each pydantic error
reported at its place in the file. :mod:`flowcheck.scenario` reads scenarios so.
"""

from flowcheck.topology._errors import report
from flowcheck.topology._yaml import Document, read

__all__ = ["Document", "read", "report"]
