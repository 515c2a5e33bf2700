"""`python -m keras_fda.launch`: the command that starts a job's worker processes.

The launcher itself is `keras_fda.runtime.launch`; this module keeps the
command short and imports no TensorFlow.
"""

import sys

from keras_fda.runtime.launch import main

if __name__ == "__main__":
    sys.exit(main())
