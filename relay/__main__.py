"""``python -m relay`` runs the ``pgws-relay`` command."""

import sys

from relay.cli import main

sys.exit(main())
