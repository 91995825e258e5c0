import sys

from ..preemption import main_then_exit
from .cli import main

sys.exit(main_then_exit(main))
