"""``python -m capsid``."""

import sys

from capsid.cli.main import main

sys.exit(main())
