import sys

from hoopops.cli import main

sys.exit(main())
