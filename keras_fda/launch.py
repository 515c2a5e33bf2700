"""`python -m keras_fda.launch`: the command that starts a job's worker processes.

The launcher itself is `keras_fda.runtime.launch`; this module keeps the
command short and imports no TensorFlow. It also runs as a file
(`python keras_fda/launch.py`) under an interpreter that has no keras_fda
installed: the launcher needs only the standard library and this checkout.
"""

import os
import sys

if not __package__:
    # Run as a file: its own folder is on the path, the checkout is not.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_fda.runtime.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
