import sys

from .cli import main_then_exit

sys.exit(main_then_exit())
