"""Command-line edge: fire turns each function's signature into its flags.

This is the only place a `UserError` becomes `error: <message>` on stderr and exit status 1.
The library never exits or prints errors itself.
"""

import os
import sys
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter hides real output


def run_cli(component, argv: list[str] | None = None, name: str | None = None) -> int:
    """Run a fire component; turn UserError (and Ctrl-C) into an exit status."""
    import fire

    from gpt2tf.errors import UserError

    try:
        fire.Fire(component, command=argv, name=name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except fire.core.FireExit as e:  # --help (0) or a usage error (2): fire printed why
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _script(fn: Callable) -> Callable[[list[str] | None], int]:
    def main(argv: list[str] | None = None) -> int:
        return run_cli(fn, argv, name=fn.__name__)

    main.__doc__ = fn.__doc__
    return main


def download(
    model_name: str = "124M",
    models_dir: str = "models",
    base_url: str = "",
    progress: bool = True,
):
    """Download an OpenAI GPT-2 model (124M, 355M, 774M, 1558M) into <models_dir>/<model_name>/.

    base_url replaces OpenAI's storage (everything before /models/); the environment variable
    GPT2_BASE_URL does the same. An interrupted download resumes when run again.
    """
    from gpt2tf import download as dl

    dl.download_model(
        str(model_name), models_dir=models_dir, base_url=base_url or None, progress=progress
    )


def encode(
    in_path: str,
    out_path: str,
    model_name: str = "124M",
    models_dir: str = "models",
    encoding: str = "utf-8",
    column: int | str = 0,
    field: str = "text",
):
    """Encode text files, a folder, a glob, .csv or .jsonl into an .npz of token ids."""
    from gpt2tf import dataset

    dataset.encode_to_npz(
        str(in_path),
        str(out_path),
        model_dir=None,
        model_name=str(model_name),
        models_dir=models_dir,
        encoding=encoding,
        column=column,
        field=field,
    )


download_main = _script(download)
encode_main = _script(encode)


def main(argv: list[str] | None = None) -> int:
    """The `gpt2tf` console command: one verb per workflow step."""
    return run_cli({"download": download, "encode": encode}, argv, name="gpt2tf")
