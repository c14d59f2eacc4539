import sys

from cratelm.cli import main

sys.exit(main())
