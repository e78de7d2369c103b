import sys

from granularity.cli import main

sys.exit(main())
