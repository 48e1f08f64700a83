"""`python -m shoal.federated fed ...`: the same commands as `shoal fed ...`."""

import sys

from shoal.cli import main

if __name__ == "__main__":
    sys.exit(main())
