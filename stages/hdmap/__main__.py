"""python -m stages.hdmap"""

import sys

from stages.hdmap import main

sys.exit(main())
