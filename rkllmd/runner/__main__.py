import sys

from .child import main

sys.exit(main(sys.argv))
