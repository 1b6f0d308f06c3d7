import sys

from glr.cli import main

sys.exit(main())
