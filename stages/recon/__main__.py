"""python -m stages.recon"""

import sys

from stages.recon import main

sys.exit(main())
