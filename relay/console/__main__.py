"""``python -m relay.console`` prints the console's directory, for ``PGWS_ROOT_PATH``."""

from relay.console import DIRECTORY

print(DIRECTORY)
