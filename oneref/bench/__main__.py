"""``python -m oneref.bench``: the same as ``oneref bench``."""

import sys

from oneref.bench import main

sys.exit(main())
