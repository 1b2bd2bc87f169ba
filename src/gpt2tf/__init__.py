"""gpt2tf: download, fine-tune, generate from and deploy OpenAI's GPT-2 in TensorFlow.

`import gpt2tf as gpt2` gives gpt-2-simple's Python API (start_tf_sess, load_gpt2, generate,
finetune, ...). TensorFlow is imported lazily, so `import gpt2tf` is cheap and has no side effects.
"""

from gpt2tf.compat import (  # noqa: F401
    Session,
    finetune,
    download_gpt2,
    encode_dataset,
    generate,
    generate_to_file,
    is_gpt2_downloaded,
    load_gpt2,
    reset_session,
    start_tf_sess,
)
from gpt2tf.errors import UserError  # noqa: F401

__version__ = "0.1.0"

