"""The README's quick tour runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_tour_runs():
    """The model blocks of the quick tour (models, fine-tuning, cached decoding) execute."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace = {}
    exec(compile("\n".join(blocks[:3]), str(README), "exec"), namespace)
    assert namespace["logits"].shape == (2, 1, namespace["cfg"].vocab_size)
    assert namespace["new"] == ["classifier/bias", "classifier/kernel"]
