"""gpt2tf: download, fine-tune, generate from and deploy OpenAI's GPT-2 in TensorFlow.

`import gpt2tf as gpt2` gives gpt-2-simple's Python API (start_tf_sess, load_gpt2, generate, ...).
TensorFlow is imported lazily, so `import gpt2tf` is cheap and has no side effects.
"""

__version__ = "0.1.0"
