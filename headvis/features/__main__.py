"""`python -m headvis.features`: see headvis/features/build.py."""

import sys

from headvis.features.build import main

sys.exit(main())
