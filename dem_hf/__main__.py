"""`python -m dem_hf ...` runs the `dem-hf` command line (also under `accelerate launch -m dem_hf`)."""

import sys

from .commands.cli import main

sys.exit(main())
