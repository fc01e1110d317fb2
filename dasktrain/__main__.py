"""``python -m dasktrain`` runs the command line."""

import sys

from dasktrain.cli import main

sys.exit(main())
