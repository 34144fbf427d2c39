"""``python -m kdkernels.bench``: the same as ``kdkernels bench``."""
import sys

from kdkernels.bench.run import main

sys.exit(main())
