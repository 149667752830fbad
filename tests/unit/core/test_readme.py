"""The README's "use it as a library" section is executable documentation: run it."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_readme_library_example_runs(phantom_cache, capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it as a library", 1)[1]
    code = re.search(r"```python\n(.+?)\n```", section, flags=re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "torch.Size([1, 2, 128, 128])"
    assert 0.0 <= float(out[1]) <= 1.0
