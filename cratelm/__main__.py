import sys

from cratelm.cli import main
from cratelm.launch_guard import guard_console

guard_console()      # a rank whose console (ssh channel, pipe) went away keeps training
sys.exit(main())
