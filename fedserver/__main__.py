"""`python -m fedserver` == the `fedserver` console script."""

import sys

from fedserver.cli import main

sys.exit(main())
