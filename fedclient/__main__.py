"""``python -m fedclient`` == the ``fedclient`` console script."""

from fedclient.cli import main

raise SystemExit(main())
