import sys

from tightfit.cli import main

sys.exit(main())
